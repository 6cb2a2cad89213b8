"""Long inputs fit the model in the evaluators (issue 17): MUSE's VerbMem prompts are far longer than a tiny Llama's
context, so `MUSEEvaluator` cuts every prompt from the left to the context minus the generation length, records the
cut in the result's meta, and refuses a generation length that alone fills the context before any compute. A model
whose context holds the prompts cuts nothing and scores as before. On the MUSE-News slice beside the checkout
(``../shared/data/muse/news``); the slice-dependent tests skip when it is absent.
"""

from __future__ import annotations

import pytest
import torch

from erasus_hf.data.muse import MUSEDataset, shared_muse_dir
from erasus_hf.evaluation.generation import cut_left, greedy_generate, prompt_budget, rouge_f1
from erasus_hf.evaluation.muse import MUSEEvaluator
from erasus_hf.modeling.tiny import build_tiny_llama, train_tokenizer

NEWS = shared_muse_dir("news")
needs_news = pytest.mark.skipif(
    NEWS is None, reason="the MUSE-News slice (../shared/data/muse/news beside this checkout) is not on this machine"
)

pytestmark = pytest.mark.filterwarnings("ignore:MUSE PrivLeak. only:UserWarning")  # 4 rows a side, on purpose

SHORT_CONTEXT = 128
ROWS = 4
NEW_TOKENS = {"max_new_tokens_verbmem": 8, "max_new_tokens_knowmem": 4}


def test_cut_left_keeps_the_special_ends_and_the_last_tokens():
    ids, mask = [1, 10, 11, 12, 13, 2], [1, 0, 0, 0, 0, 1]  # BOS ... EOS
    assert cut_left(ids, mask, 6) == ids and cut_left(ids, mask, 10) == ids
    assert cut_left(ids, mask, 4) == [1, 12, 13, 2]
    assert cut_left([1, 10, 11, 12], [1, 0, 0, 0], 2) == [1, 12]  # a Llama prompt: BOS, then its end
    assert cut_left([1, 2, 10], [1, 1, 0], 2) == [2, 10]  # the specials alone fill the limit: the last tokens


@pytest.fixture(scope="module")
def news() -> MUSEDataset:
    return MUSEDataset.load("news", data_dir=NEWS).select(ROWS)


@pytest.fixture(scope="module")
def news_tokenizer(news):
    return train_tokenizer(list(news.privleak_forget["text"]) + list(news.verbmem_forget["prompt"]), vocab_size=1024)


def _recording(model: torch.nn.Module) -> list[int]:
    """The positions each forward pass of `model` reaches (prompt length, then the cache position while generating),
    and, through `generate`, that each prompt handed over leaves room for the new tokens."""
    positions: list[int] = []

    def hook(module, args, kwargs):
        cache_position = kwargs.get("cache_position")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        positions.append(int(cache_position[-1]) + 1 if cache_position is not None else input_ids.shape[1])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return positions


@needs_news
def test_short_context_cuts_prompts_from_the_left_and_records_it(news, news_tokenizer):
    tokenizer = news_tokenizer
    prompts = list(news.verbmem_forget["prompt"])
    assert min(len(tokenizer(p)["input_ids"]) for p in prompts) > 4 * SHORT_CONTEXT  # every prompt must be cut
    model = build_tiny_llama(tokenizer, max_position_embeddings=SHORT_CONTEXT).eval()
    generate, handed = model.generate, []

    def recording_generate(input_ids, **kwargs):
        handed.append((input_ids.clone(), kwargs["max_new_tokens"]))
        return generate(input_ids=input_ids, **kwargs)

    model.generate = recording_generate
    positions = _recording(model)
    result = MUSEEvaluator(news, batch_size=ROWS, **NEW_TOKENS).evaluate(model, tokenizer)

    assert len(handed) == 3  # verbmem, knowmem forget, knowmem retain: one batch each
    for input_ids, max_new_tokens in handed:
        assert input_ids.shape[1] + max_new_tokens <= SHORT_CONTEXT
    assert max(positions) <= SHORT_CONTEXT  # no forward pass (generation or PrivLeak) past the context
    # The verbmem batch: every prompt cut to the budget, its BOS kept and its END (where the continuation starts).
    verbmem_ids, _ = handed[0]
    budget = SHORT_CONTEXT - NEW_TOKENS["max_new_tokens_verbmem"]
    assert verbmem_ids.shape[1] == budget
    for row, prompt in zip(verbmem_ids.tolist(), prompts, strict=True):
        full = tokenizer(prompt)["input_ids"]
        assert row[0] == tokenizer.bos_token_id and row[1:] == full[-(budget - 1) :]

    truncation = result.meta["muse/truncation"]
    assert truncation["context"] == SHORT_CONTEXT
    assert truncation["verbmem_forget"] == {"max_prompt_tokens": budget, "prompts_cut": ROWS, "prompts": ROWS}
    knowmem_budget = SHORT_CONTEXT - NEW_TOKENS["max_new_tokens_knowmem"]
    for side in ("knowmem_forget", "knowmem_retain"):  # ten few-shot examples do not fit 124 tokens either
        assert truncation[side] == {"max_prompt_tokens": knowmem_budget, "prompts_cut": ROWS, "prompts": ROWS}
    assert truncation["privleak"] == {"max_length": SHORT_CONTEXT, "texts_cut": 2 * ROWS}  # default 2048, capped
    assert len(result.per_example["muse/verbmem_forget_rouge_f1"]) == ROWS


@needs_news
def test_generation_length_that_fills_the_context_fails_before_any_compute(news, news_tokenizer):
    model = build_tiny_llama(news_tokenizer, max_position_embeddings=SHORT_CONTEXT).eval()
    positions = _recording(model)
    evaluator = MUSEEvaluator(news, max_new_tokens_verbmem=SHORT_CONTEXT, max_new_tokens_knowmem=4)
    with pytest.raises(ValueError, match=r"max_new_tokens_verbmem=128 leaves no room.*Lower max_new_tokens_verbmem"):
        evaluator.evaluate(model, news_tokenizer)
    evaluator = MUSEEvaluator(news, max_new_tokens_verbmem=4, max_new_tokens_knowmem=SHORT_CONTEXT + 1)
    with pytest.raises(ValueError, match="Lower max_new_tokens_knowmem below 128"):
        evaluator.evaluate(model, news_tokenizer)
    assert positions == []
    with pytest.raises(ValueError, match="Lower max_new_tokens below 128"):  # the generic name, for other callers
        prompt_budget(model, SHORT_CONTEXT)


@needs_news
def test_long_enough_context_cuts_nothing_and_scores_as_before(news, news_tokenizer):
    tokenizer = news_tokenizer
    prompts = list(news.verbmem_forget["prompt"])
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    model = build_tiny_llama(tokenizer, max_position_embeddings=longest + 64).eval()
    evaluator = MUSEEvaluator(news, batch_size=ROWS, max_length=64, **NEW_TOKENS)
    result = evaluator.evaluate(model, tokenizer)

    truncation = result.meta["muse/truncation"]
    for part in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        assert truncation[part]["prompts_cut"] == 0
    assert truncation["privleak"]["max_length"] == 64  # the evaluator's own limit, within the context
    # The same numbers as generating the whole prompts without any budget (the behaviour before the cut existed).
    whole = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=ROWS)
    expected = [rouge_f1(c, gt) for c, gt in zip(whole, news.verbmem_forget["gt"], strict=True)]
    assert result.per_example["muse/verbmem_forget_rouge_f1"] == expected
