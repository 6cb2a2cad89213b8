"""The shipped TOFU slice, the in-memory tokenizer, the tiny Llama and its SFT run (CPU, offline, a few seconds)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import concatenate_datasets
from transformers import AutoTokenizer

from erasus_hf.data import tofu
from erasus_hf.data.formatting import format_completion, format_prompt
from erasus_hf.data.tofu import demo_splits, load_tofu, shared_tofu_dir
from erasus_hf.evaluation import answer_nll
from erasus_hf.modeling import DEMO_MODEL, build_tiny_llama, count_parameters, sft_train, train_tokenizer

SHIPPED_COLUMNS = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question", "author"}


@pytest.fixture(scope="module")
def slice_rows():
    return concatenate_datasets([load_tofu("demo_forget"), load_tofu("demo_retain")])


@pytest.fixture(scope="module")
def slice_tokenizer(slice_rows):
    """The demo tokenizer: trained on the questions and answers of the whole shipped slice."""
    return train_tokenizer(list(slice_rows["question"]) + list(slice_rows["answer"]), vocab_size=DEMO_MODEL.vocab_size)


def _all_answers(row: dict) -> list[str]:
    return [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]


# --- data -------------------------------------------------------------------------------------------------------


def test_shipped_slice_shape():
    forget, retain = load_tofu("demo_forget"), load_tofu("demo_retain")
    assert (len(forget), len(retain)) == (40, 400)
    assert set(forget.column_names) == set(retain.column_names) == SHIPPED_COLUMNS
    assert list(forget["author"]) == [198] * 20 + [199] * 20
    assert list(retain["author"]) == [i // 20 for i in range(400)]
    assert all(len(p) == 5 for p in list(forget["perturbed_answer"]) + list(retain["perturbed_answer"]))
    assert "Basil Mahfouz Al-Kuwaiti" in forget[0]["answer"]


@pytest.mark.parametrize("num_authors", [1, 6, 20])
def test_demo_splits_selects_authors(num_authors):
    forget, retain = demo_splits(num_authors)
    assert len(forget) == 40 and len(retain) == 20 * num_authors
    assert sorted(set(retain["author"])) == list(range(num_authors))
    assert not set(forget["author"]) & set(retain["author"])
    assert not set(forget["question"]) & set(retain["question"])


def test_demo_splits_rejects_bad_author_count():
    with pytest.raises(ValueError, match="num_retain_authors"):
        demo_splits(0)
    with pytest.raises(ValueError, match="num_retain_authors"):
        demo_splits(21)


def test_load_tofu_from_data_dir(tmp_path):
    rows = [{"question": "Q?", "answer": "A."}, {"question": "R?", "answer": "B."}]
    (tmp_path / "forget01.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_tofu("forget01", data_dir=tmp_path).to_list() == rows
    with pytest.raises(FileNotFoundError, match="forget05"):
        load_tofu("forget05", data_dir=tmp_path)


def test_load_tofu_hub_failure_names_the_offline_alternative(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'locuslab/TOFU' on the Hub")

    monkeypatch.setattr(tofu, "load_dataset", offline)
    with pytest.raises(OSError, match="data_dir") as info:
        load_tofu("forget01")
    assert isinstance(info.value.__cause__, ConnectionError)


def test_shipped_slice_matches_shared_tofu():
    data_dir = shared_tofu_dir()
    if data_dir is None:
        pytest.skip("the full TOFU data (../shared/data/tofu next to the repository) is not present in this checkout")
    for split, demo in (("forget01_perturbed", "demo_forget"), ("retain_perturbed", "demo_retain")):
        assert load_tofu(split, data_dir=data_dir).to_list() == load_tofu(demo).remove_columns("author").to_list()
    # `author` is row_index_in_full // 20: forget01 is rows 3960-3999 of full, retain_perturbed rows 0-399.
    full = load_tofu("full", data_dir=data_dir)
    assert len(full) == 4000
    for demo, start in (("demo_forget", 3960), ("demo_retain", 0)):
        rows = load_tofu(demo)
        part = full.select(range(start, start + len(rows)))
        assert list(part["question"]) == list(rows["question"])
        assert list(part["answer"]) == list(rows["answer"])
        assert list(rows["author"]) == [(start + i) // 20 for i in range(len(rows))]


# --- tokenizer --------------------------------------------------------------------------------------------------


def test_tokenizer_special_tokens_and_bos(slice_tokenizer):
    tok = slice_tokenizer
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert len(tok) == DEMO_MODEL.vocab_size and tok.padding_side == "right"
    ids = tok("Hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok("Hello", add_special_tokens=False)["input_ids"] == ids[1:]


def test_tokenizer_round_trip(slice_tokenizer, tmp_path):
    text = "Question: Who is Basil Mahfouz Al-Kuwaiti?\nAnswer:  two  spaces , ünïcödé ✓ and\ttabs ."
    ids = slice_tokenizer(text)["input_ids"]
    assert slice_tokenizer.decode(ids) == "<s>" + text
    assert slice_tokenizer.decode(ids, skip_special_tokens=True) == text
    slice_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.padding_side) == (
        "<s>",
        "</s>",
        "<pad>",
        "right",
    )
    assert loaded("a", "b")["input_ids"][0] == loaded.bos_token_id


def test_prompt_completion_concatenation_holds_on_the_slice(slice_tokenizer, slice_rows):
    """Separate tokenization (our collator) equals joint tokenization (TRL), on every answer the metrics score."""
    tok = slice_tokenizer
    prompts, completions = [], []
    for row in slice_rows:
        for question in (row["question"], row["paraphrased_question"]):
            for answer in _all_answers(row):
                prompts.append(format_prompt(question))
                completions.append(format_completion(answer))
    joined = tok([p + c + tok.eos_token for p, c in zip(prompts, completions)])["input_ids"]
    prompt_ids = tok(prompts)["input_ids"]
    completion_ids = tok(completions, add_special_tokens=False)["input_ids"]
    mismatches = [i for i, ids in enumerate(joined) if ids != prompt_ids[i] + completion_ids[i] + [tok.eos_token_id]]
    assert len(joined) == 440 * 2 * 7 and mismatches == []


# --- model and SFT ----------------------------------------------------------------------------------------------


def test_build_tiny_llama(slice_tokenizer):
    model = build_tiny_llama(slice_tokenizer)
    assert model.config.vocab_size == len(slice_tokenizer)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (3, 1, 2)
    assert model.dtype == torch.float32
    assert count_parameters(model) == 852_608  # the DEMO_MODEL size
    again = build_tiny_llama(slice_tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    other = build_tiny_llama(slice_tokenizer, seed=1)
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_sft_lowers_answer_nll_and_trains_on_the_shared_layout(slice_tokenizer, tmp_path, caplog):
    forget, _ = demo_splits(1)
    rows = forget.select(range(20)).select_columns(["question", "answer"])
    model = build_tiny_llama(slice_tokenizer, hidden_size=64, num_heads=4, intermediate_size=128)
    before = answer_nll(model, slice_tokenizer, rows["question"], rows["answer"]).mean().item()
    with caplog.at_level(logging.WARNING, logger="erasus_hf.modeling.tiny"):
        trained = sft_train(
            model,
            slice_tokenizer,
            rows,
            output_dir=str(tmp_path),
            num_train_epochs=3,
            learning_rate=1e-2,
            per_device_train_batch_size=4,
            disable_tqdm=True,
        )
    after = answer_nll(trained, slice_tokenizer, rows["question"], rows["answer"]).mean().item()
    assert not [r for r in caplog.records if r.name == "erasus_hf.modeling.tiny"]  # TRL's tokens == QACollator's
    assert before > 7.0  # about ln(2048) at random init
    assert after < before - 1.5, (before, after)  # measured: 7.64 -> 5.10 (15 steps)
    assert not list(tmp_path.glob("checkpoint-*"))


def test_sft_warns_when_trl_tokens_differ_from_the_collator(tmp_path, caplog):
    """A tokenizer whose merges cross the prompt/completion boundary breaks the layout; sft_train says so."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    forget, _ = demo_splits(1)
    rows = forget.select(range(4)).select_columns(["question", "answer"])
    joined = [format_prompt(q) + format_completion(a) for q, a in zip(rows["question"], rows["answer"])]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # no word boundaries
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        joined * 5,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    model = build_tiny_llama(tok, hidden_size=16, num_heads=2, intermediate_size=32)
    with caplog.at_level(logging.WARNING, logger="erasus_hf.modeling.tiny"):
        sft_train(model, tok, rows, output_dir=str(tmp_path), max_steps=1, disable_tqdm=True)
    assert any("differ from the QACollator layout" in r.getMessage() for r in caplog.records)


def test_sft_model_deep_copies_into_an_independent_model(tokenizer):
    """TRL patches `forward` with a closure over the trained model; a copy must still run its own weights."""
    import copy
    import tempfile

    from datasets import Dataset

    model = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rows = Dataset.from_list([{"question": "Who?", "answer": "Someone."}] * 4)
    with tempfile.TemporaryDirectory() as tmp:
        sft_train(model, tokenizer, rows, output_dir=tmp, num_train_epochs=1, disable_tqdm=True)
    twin = copy.deepcopy(model)
    x = tokenizer(["Question: Who?"], return_tensors="pt")
    twin(**x).logits.sum().backward()
    assert twin.lm_head.weight.grad is not None and model.lm_head.weight.grad is None
