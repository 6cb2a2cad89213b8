"""Evaluation renders rows as training does (issue 17): the evaluators take the trainer's `TextFormat`, so a chat model
is scored and prompted through its chat template; the format lands in the result's meta, the card and the run record;
MUSE reports the perplexity of its raw forget articles, windowed as training windows them.

The chat tokenizer is the session's byte-level BPE with a small chat template built here (with `{% generation %}`
marks, as TRL's training templates have); the chat model is a tiny Llama fitted on the chat rendering of eight TOFU
forget rows (150 full-batch steps: answer NLL 0.003 through the chat template, 1.03 through the plain prompt).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset

from erasus_hf import UnlearningTrainer
from erasus_hf.data.collator import QACollator
from erasus_hf.data.formats import TextFormat, template_sha256
from erasus_hf.data.formatting import format_prompt
from erasus_hf.data.muse import MUSEDataset, shared_muse_dir
from erasus_hf.data.tofu import TOFUDataset
from erasus_hf.evaluation import MemorizationEvaluator, MetricSuite, MIAEvaluator, MUSEEvaluator, TOFUEvaluator
from erasus_hf.evaluation import muse as muse_module
from erasus_hf.evaluation import tofu as tofu_module
from erasus_hf.evaluation.muse import few_shot_prompt
from erasus_hf.evaluation.robustness import forget_metrics
from erasus_hf.modeling.tiny import build_tiny_llama, train_tokenizer

from .testing_utils import config, qa

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROWS = 8
PLAIN = TextFormat(use_chat_template=False)


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)  # the session's tokenizer stays template-free
    chat.chat_template = TEMPLATE
    return chat


@pytest.fixture(scope="module")
def tofu_data(tofu_slice) -> TOFUDataset:
    forget, _ = tofu_slice
    return TOFUDataset(forget=forget.select(range(ROWS)), forget_split="forget01")


@pytest.fixture(scope="module")
def chat_model(chat_tokenizer, tofu_data):
    """A tiny Llama that knows its eight rows through the chat template (trained with the default training format)."""
    rows = tofu_data.forget
    batch = QACollator(chat_tokenizer, 128)(
        [{"question": q, "answer": a} for q, a in zip(rows["question"], rows["answer"])]
    )
    model = build_tiny_llama(chat_tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def chat_ids(tokenizer, messages) -> list[int]:
    """The ids of `messages` through the chat template, with its generation prompt (transformers' own call)."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def record_calls(monkeypatch, module, name: str, returns=None, takes_tokenizer: bool = True) -> list:
    """Record what each call of `module.name(model, [tokenizer,] items, ...)` gets as `items` (the batches scored,
    the prompts generated from); call through, unless `returns` gives the answer from the items."""
    calls, original = [], getattr(module, name)

    def recorder(model, *args, **kwargs):
        head, (items, *rest) = (args[:1], args[1:]) if takes_tokenizer else ((), args)
        calls.append(list(items))
        return returns(calls[-1]) if returns is not None else original(model, *head, calls[-1], *rest, **kwargs)

    monkeypatch.setattr(module, name, recorder)
    return calls


@pytest.mark.parametrize("use_chat_template", [None, False], ids=["chat-template", "prompt-template"])
def test_tofu_scores_and_asks_as_the_trainer_renders(
    monkeypatch, tmp_path, chat_tokenizer, tiny_llama, tofu_data, use_chat_template
):
    rows = tofu_data.forget
    args = config(tmp_path, strategy="ga", retain_loss="none", use_chat_template=use_chat_template, max_length=128)
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=qa(rows), processing_class=chat_tokenizer)
    training = trainer.data_collator.side_collator(
        [{"question": q, "answer": a} for q, a in zip(rows["question"], rows["answer"])]
    )

    scored = record_calls(monkeypatch, tofu_module, "token_stats", takes_tokenizer=False)
    prompts = record_calls(monkeypatch, tofu_module, "greedy_generate", returns=lambda p: [""] * len(p))
    evaluator = TOFUEvaluator(tofu_data, batch_size=3 * ROWS, max_length=128, text_format=trainer.text_format)
    result = evaluator.evaluate(tiny_llama, chat_tokenizer)

    # the answers are the first ROWS rows scored, token for token as the training collator lays them out
    first = scored[0][0]
    width = training["input_ids"].shape[1]
    assert torch.equal(first["input_ids"][:ROWS, :width], training["input_ids"])
    assert torch.equal(first["labels"][:ROWS, :width], training["labels"])
    assert (first["labels"][:ROWS, width:] == -100).all()
    # the ROUGE prompts: the question as the trained prompt, one BOS
    if use_chat_template is None:
        expected = [chat_ids(chat_tokenizer, [{"role": "user", "content": q}]) for q in rows["question"]]
        assert result.meta["text_format"]["qa"] == "chat template"
    else:
        expected = [chat_tokenizer(format_prompt(q))["input_ids"] for q in rows["question"]]
        assert result.meta["text_format"]["qa"] == "prompt template"
    assert [list(p) for p in prompts[0]] == [list(e) for e in expected]
    assert all(list(p).count(chat_tokenizer.bos_token_id) == 1 for p in prompts[0])


def test_a_chat_model_scored_through_the_plain_template_looks_worse(chat_model, chat_tokenizer, tofu_data):
    options = dict(batch_size=3 * ROWS, max_new_tokens=48, max_length=128)
    chat = TOFUEvaluator(tofu_data, **options).evaluate(chat_model, chat_tokenizer)
    plain = TOFUEvaluator(tofu_data, **options, text_format=PLAIN).evaluate(chat_model, chat_tokenizer)
    # measured: prob 0.997 / 0.379, ROUGE 0.918 / 0.157
    assert chat.summary["tofu/forget_prob"] > 0.95 > 0.8 > plain.summary["tofu/forget_prob"]
    assert chat.summary["tofu/forget_rouge"] > 0.8 > plain.summary["tofu/forget_rouge"] + 0.3
    assert chat.meta["text_format"]["chat_template_sha256"] == template_sha256(chat_tokenizer)
    assert plain.meta["text_format"]["prompt_template"] == "Question: {question}\nAnswer:"
    with pytest.raises(ValueError, match="rendered the QA rows otherwise .*qa: reference 'chat template'"):
        TOFUEvaluator(tofu_data, **options, text_format=PLAIN).evaluate(chat_model, chat_tokenizer, reference=chat)
    with pytest.raises(ValueError, match="chat template"):  # asked for, absent: refused before any forward pass
        bare = copy.deepcopy(chat_tokenizer)
        bare.chat_template = None
        TOFUEvaluator(tofu_data, text_format=TextFormat(use_chat_template=True)).evaluate(chat_model, bare)


def test_mia_memorization_and_robustness_score_the_rows_as_trained(chat_model, chat_tokenizer, tofu_slice):
    forget, retain = tofu_slice
    members, nonmembers = qa(forget.select(range(ROWS))), qa(retain.select(range(ROWS)))
    figures = {}
    for name, text_format in (("chat", None), ("plain", PLAIN)):
        with pytest.warns(UserWarning, match="Membership inference"):  # 8 rows a side
            mia = MIAEvaluator(members, nonmembers, attacks=("loss",), text_format=text_format)
            mia = mia.evaluate(chat_model, chat_tokenizer)
        memorization = MemorizationEvaluator({"forget": members}, text_format=text_format)
        memorization = memorization.evaluate(chat_model, chat_tokenizer)
        prob = forget_metrics(chat_model, chat_tokenizer, members, text_format=text_format)[0]["forget_prob"]
        loss = mia.per_example["mia/loss_members"]
        figures[name] = {
            "loss": sum(loss) / len(loss),  # the members' mean -NLL
            "memorized": memorization.summary["memorization/forget_exact_memorization"],
            "prob": prob,
        }
        assert mia.meta["text_format"] == memorization.meta["text_format"]
        assert mia.meta["text_format"]["qa"] == ("chat template" if text_format is None else "prompt template")
    # the trained rendering is the memorised one (measured: -NLL -0.0026 / -1.03, EM 1.0 / 0.774, P 0.997 / 0.379)
    chat, plain = figures["chat"], figures["plain"]
    assert chat["loss"] > -0.05 > plain["loss"] + 0.5
    assert chat["memorized"] > 0.99 and chat["memorized"] > plain["memorized"] + 0.1
    assert chat["prob"] > 0.95 > 0.8 > plain["prob"]


def test_the_trainer_evaluates_records_and_cards_its_format(tmp_path, chat_tokenizer, tiny_llama, tofu_data):
    # the prompt template on a tokenizer that has a chat template: only the trainer's format says so
    args = config(tmp_path, strategy="ga", retain_loss="none", use_chat_template=False, max_length=128)
    suite = MetricSuite(["tofu"], options={"tofu": {"rouge": False, "max_length": 128}})
    trainer = UnlearningTrainer(
        tiny_llama,
        args,
        forget_dataset=qa(tofu_data.forget),
        processing_class=chat_tokenizer,
        evaluators=suite,
        evaluation_data={"tofu": tofu_data},
    )
    trainer.evaluate()
    meta = trainer.last_evaluation.meta["text_format"]
    assert meta == trainer.text_format.describe(chat_tokenizer, {"forget": "qa"})
    assert meta["qa"] == "prompt template" and meta["rows"] == {"forget": "qa"}

    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- Row formats: forget `qa` through the prompt template `Question: {question}\\nAnswer:`" in card
    record = json.loads((tmp_path / "out" / "text_format.json").read_text())
    assert record["row_formats"] == {"forget": "qa"} and record["text_format"]["max_length"] == 128

    chat_args = config(tmp_path / "chat", strategy="ga", retain_loss="none", max_length=128)
    chat_trainer = UnlearningTrainer(
        tiny_llama, chat_args, forget_dataset=qa(tofu_data.forget), processing_class=chat_tokenizer
    )
    chat_trainer.save_model()
    card = (tmp_path / "chat" / "out" / "README.md").read_text()
    digest = template_sha256(chat_tokenizer)
    assert f"- Row formats: forget `qa` through the chat template (sha256 `{digest}`)" in card


def test_knowmem_asks_with_earlier_chat_turns_and_verbmem_stays_raw(
    monkeypatch, chat_tokenizer, tiny_llama, tofu_slice
):
    forget, retain = tofu_slice
    qa_rows = lambda d: Dataset.from_dict({"question": d["question"], "answer": d["answer"]})  # noqa: E731
    text = Dataset.from_dict({"text": list(forget["answer"][:4])})
    data = MUSEDataset(
        verbmem_forget=Dataset.from_dict({"prompt": list(forget["question"][:2]), "gt": list(forget["answer"][:2])}),
        knowmem_forget_qa=qa_rows(forget.select(range(2))),
        knowmem_retain_qa=qa_rows(retain.select(range(2))),
        knowmem_forget_qa_icl=qa_rows(forget.select([38, 39])),
        knowmem_retain_qa_icl=qa_rows(retain.select([39])),
        privleak_forget=text,
        privleak_holdout=Dataset.from_dict({"text": list(retain["answer"][:4])}),
    )
    prompts = record_calls(monkeypatch, muse_module, "greedy_generate", returns=lambda p: [""] * len(p))
    with pytest.warns(UserWarning, match="PrivLeak"):  # 4 texts a side
        result = MUSEEvaluator(data, batch_size=4, max_length=64).evaluate(tiny_llama, chat_tokenizer)
    verbmem, knowmem_forget, _ = prompts
    assert verbmem == list(forget["question"][:2])  # raw text, no template
    shots = [
        m
        for q, a in zip(forget["question"][38:40], forget["answer"][38:40])
        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    expected = chat_ids(chat_tokenizer, [*shots, {"role": "user", "content": forget["question"][0]}])
    assert list(knowmem_forget[0]) == list(expected) and expected.count(chat_tokenizer.bos_token_id) == 1
    assert result.meta["text_format"]["qa"] == "chat template" and "muse/forget_ppl" not in result.summary

    plain = MUSEEvaluator(data, text_format=PLAIN).knowmem_prompts(chat_tokenizer, "forget")
    icl = data.knowmem_forget_qa_icl
    assert (
        plain[0] == chat_tokenizer(few_shot_prompt(forget["question"][0], icl["question"], icl["answer"]))["input_ids"]
    )


NEWS = shared_muse_dir("news")
WINDOW = 64


def hand_perplexity(model, tokenizer, texts) -> float:
    """exp(mean NLL) over every token after the BOS of each article cut into windows of WINDOW tokens (BOS + 63)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            bos, body = ids[:1], ids[1:]
            for start in range(0, len(body), WINDOW - 1):
                window = torch.tensor([bos + body[start : start + WINDOW - 1]])
                logp = model(window).logits[0, :-1].float().log_softmax(-1)
                nll -= logp.gather(-1, window[0, 1:, None]).sum().item()
                count += window.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.skipif(NEWS is None, reason="the MUSE-News slice (../shared/data/muse/news) is not on this machine")
def test_muse_forget_perplexity_rises_when_the_trainer_unlearns_the_raw_articles(monkeypatch, tmp_path):
    data = MUSEDataset.load("news", data_dir=NEWS).select(4)
    articles = list(data.raw_forget["text"])
    tokenizer = train_tokenizer(articles + list(data.privleak_holdout["text"]), vocab_size=512)
    model = build_tiny_llama(tokenizer, seed=0)
    # the "target" model: it has read the four articles (fitted on their training windows)
    windows = [w for t in articles for w in TextFormat().encode(tokenizer, {"text": t}, WINDOW)]
    batch = QACollator(tokenizer, WINDOW)(windows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    record_calls(monkeypatch, muse_module, "greedy_generate", returns=lambda p: [""] * len(p))  # no generation here
    suite = MetricSuite(["muse"], options={"muse": {"max_length": WINDOW, "batch_size": 32}})
    args = config(
        tmp_path, strategy="ga", retain_loss="none", max_length=WINDOW, learning_rate=3e-3, num_train_epochs=2
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=data.raw_forget,
        processing_class=tokenizer,
        evaluators=suite,
        evaluation_data={"muse": data},
    )
    with pytest.warns(UserWarning, match="PrivLeak"):
        before = trainer.evaluate()["eval_muse/forget_ppl"]
    assert before == pytest.approx(hand_perplexity(model, tokenizer, articles), rel=1e-5)
    meta = trainer.last_evaluation.meta
    assert meta["muse/forget_ppl"]["articles"] == 4 and meta["muse/forget_ppl"]["windows"] == len(windows)
    assert meta["text_format"]["rows"] == {"forget": "text"}

    trainer.train()
    with pytest.warns(UserWarning, match="PrivLeak"):
        after = trainer.evaluate()["eval_muse/forget_ppl"]
    assert after > 3 * before  # measured: 81 -> 1.2e9
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"- Row formats: forget `text` (windows of {WINDOW} tokens)" in card
