"""MUSE metrics and loader.

No MUSE data exists on this machine (and the Hub is unreachable), so these tests build a small local folder in MUSE's
layout (``{config}/{split}.json``) from the shipped TOFU slice: they test the loader and the metrics on MUSE-SHAPED
data, not MUSE itself. VerbMem prompts are TOFU questions in the training prompt format with the answer as the true
continuation; PrivLeak members are forget question/answer texts the memorised model trained on, non-members the rows
of two shipped retain authors it never saw.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from datasets import Dataset

from erasus_hf.data.formatting import format_completion, format_prompt
from erasus_hf.data.muse import MUSEDataset
from erasus_hf.data.tofu import load_tofu
from erasus_hf.evaluation.muse import MUSEEvaluator, cut_answer, few_shot_prompt, privleak
from erasus_hf.evaluation.result import EvaluationResult

N = 8


def _write(path: Path, rows: list[dict], as_array: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_array:  # MUSE's GitHub data files are JSON arrays; the Hub's are JSON-lines; both load.
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def muse_dir(tofu_slice, tmp_path_factory) -> Path:
    forget, retain = tofu_slice
    root = tmp_path_factory.mktemp("muse") / "news"
    qa = lambda rows: [{"question": r["question"], "answer": r["answer"]} for r in rows]  # noqa: E731
    text = lambda rows: [{"text": format_prompt(r["question"]) + format_completion(r["answer"])} for r in rows]  # noqa: E731
    seen = set(forget["author"]) | set(retain["author"])
    unseen = load_tofu("demo_retain").filter(lambda a: a not in seen, input_columns="author")
    first = forget.select(range(N))
    _write(root / "verbmem/forget.json", [{"prompt": format_prompt(r["question"]), "gt": r["answer"]} for r in first])
    _write(root / "knowmem/forget_qa.json", qa(first))
    _write(root / "knowmem/retain_qa.json", qa(retain.select(range(N))))
    _write(root / "knowmem/forget_qa_icl.json", qa(forget.select([39])), as_array=True)
    _write(root / "knowmem/retain_qa_icl.json", qa(retain.select([39])))
    _write(root / "privleak/forget.json", text(forget.select(range(10, 10 + N))))
    _write(root / "privleak/holdout.json", text(unseen.select(range(N))))
    return root


def test_privleak_hand_computed():
    assert privleak(0.8, 0.5) == pytest.approx(60.0)  # (0.8 - 0.5) / 0.5 x 100
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.25, 0.5) == pytest.approx(-50.0)
    assert privleak(1.0, 0.8) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="AUC"):
        privleak(0.5, 0.0)


def test_few_shot_prompt_and_answer_cut():
    prompt = few_shot_prompt("Who?", ["Where?"], ["Paris."])
    assert prompt == "Question: Where?\nAnswer: Paris.\n\nQuestion: Who?\nAnswer:"
    assert few_shot_prompt("Who?") == format_prompt("Who?")
    assert cut_answer(" Alice Smith.\n\nQuestion: Why?") == "Alice Smith."
    assert cut_answer("Bob\nQuestion: x") == "Bob"
    assert cut_answer("Carol Question: y") == "Carol"
    with pytest.raises(ValueError, match="few-shot"):
        few_shot_prompt("Who?", ["a", "b"], ["c"])


def test_loader_on_muse_shaped_folder(muse_dir):
    data = MUSEDataset.load("news", data_dir=muse_dir)
    assert data.corpus == "news"
    assert data.verbmem_forget.column_names == ["prompt", "gt"] and len(data.verbmem_forget) == N
    assert len(data.knowmem_forget_qa) == N and len(data.knowmem_retain_qa) == N
    assert len(data.knowmem_forget_qa_icl) == 1  # read from a JSON array
    assert len(data.privleak_forget) == N and len(data.privleak_holdout) == N
    small = data.select(3)
    assert len(small.verbmem_forget) == 3 and len(small.privleak_holdout) == 3
    assert len(small.knowmem_forget_qa_icl) == 1  # few-shot examples are kept
    with pytest.raises(FileNotFoundError, match="privleak/holdout"):
        (muse_dir / "privleak/holdout.json").rename(muse_dir / "privleak/held.json")
        try:
            MUSEDataset.load(data_dir=muse_dir)
        finally:
            (muse_dir / "privleak/held.json").rename(muse_dir / "privleak/holdout.json")
    with pytest.raises(ValueError, match=r"lacks the columns \['gt'\].*it has \['prompt'\]"):
        replace(data, verbmem_forget=Dataset.from_dict({"prompt": ["p"]}))
    with pytest.raises(ValueError, match="Unknown MUSE corpus"):
        MUSEDataset.load("poems")


# `_memorised` (the session's model, not a copy): evaluation only reads the model and restores its train/eval mode.
def test_muse_evaluator_on_memorised_model(_memorised, tokenizer, muse_dir):
    data = MUSEDataset.load(data_dir=muse_dir)
    result = MUSEEvaluator(data, batch_size=N).evaluate(_memorised, tokenizer)
    s = result.summary
    assert s["muse/verbmem_forget_rouge_f1"] > 0.8  # the memorised model continues its training text verbatim
    assert 0.0 <= s["muse/knowmem_forget_rouge_recall"] <= 1.0 and 0.0 <= s["muse/knowmem_retain_rouge_recall"] <= 1
    assert s["muse/privleak_auc"] > 0.9  # members (trained on) have far higher Min-K% than unseen authors
    assert "muse/privleak" not in s and "no reference" in result.meta["muse/privleak_missing"]
    assert len(result.per_example["muse/verbmem_forget_rouge_f1"]) == N
    assert len(result.per_example["muse/privleak_holdout_min_k"]) == N

    # Zero-shot KnowMem asks in the training format, so the memorised model answers its forget questions.
    zero_shot = replace(data, knowmem_forget_qa_icl=Dataset.from_dict({"question": [], "answer": []}))
    evaluator = MUSEEvaluator(zero_shot, batch_size=N, max_new_tokens_knowmem=160)
    assert sum(evaluator.knowmem(_memorised, tokenizer, "forget")) / N > 0.9


def test_privleak_against_reference_runs(_memorised, tokenizer, muse_dir, tmp_path):
    evaluator = MUSEEvaluator(
        MUSEDataset.load(data_dir=muse_dir).select(4), max_new_tokens_verbmem=4, max_new_tokens_knowmem=4, batch_size=N
    )
    with pytest.raises(KeyError, match="privleak_auc"):  # checked before any forward pass
        evaluator.evaluate(_memorised, tokenizer, EvaluationResult(summary={"tofu/forget_prob": 1.0}))
    own = evaluator.evaluate(_memorised, tokenizer)
    own.save(tmp_path / "reference.json")
    again = evaluator.evaluate(_memorised, tokenizer, EvaluationResult.load(tmp_path / "reference.json"))
    assert again.summary["muse/privleak"] == 0.0
    hand = evaluator.evaluate(_memorised, tokenizer, EvaluationResult(summary={"muse/privleak_auc": 0.8}))
    assert hand.summary["muse/privleak"] == pytest.approx((hand.summary["muse/privleak_auc"] - 0.8) / 0.8 * 100)
    assert hand.summary["muse/privleak"] > 10  # AUC > 0.9 against a retain AUC of 0.8: the forget set leaks
