"""MUSE metrics and loader on MUSE-SHAPED data.

These tests build a small local folder in MUSE's layout (``{config}/{split}.json``) from the shipped TOFU slice, so
they run from a bare clone (the Hub is unreachable): they test the loader and the metrics on MUSE-shaped data, not
MUSE itself (``test_muse_shared.py`` does, on the MUSE-News slice in ``../shared`` when present). VerbMem prompts are
TOFU questions in the training prompt format with the answer as the true continuation; PrivLeak members are forget
question/answer texts the memorised model trained on, non-members the rows of two shipped retain authors it never saw.
"""

from __future__ import annotations

import json
import shutil
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
    # MUSE's convention on the conventional AUCs (forget = members): flip both, divide by the retain model's.
    assert privleak(0.8, 0.6) == pytest.approx(-50.0)  # ((1 - 0.8) - (1 - 0.6)) / (1 - 0.6) x 100
    assert privleak(0.3, 0.6) == pytest.approx(75.0)  # (0.7 - 0.4) / 0.4 x 100: over-unlearned
    assert privleak(1.0, 0.5) == pytest.approx(-100.0)  # memorised against an indistinguishable retrain
    assert privleak(0.5, 0.5) == 0.0 and privleak(0.0, 0.5) == pytest.approx(100.0)
    # The case: a retain AUC of 0.1783 (flipped 0.8217). The old formula, (AUC - AUC_r) / AUC_r x 100, gave
    # +460.8; open-unlearning's privleak ((1 - AUC) - (1 - AUC_r)) / (1 - AUC_r) x 100 gives -100.
    assert privleak(1.0, 0.1783) == pytest.approx(-100.0)
    # MUSE's own News numbers: retrain flipped AUC 0.4772 (constants.AUC_RETRAIN), a target with flipped AUC 0.05.
    assert privleak(1 - 0.05, 1 - 0.4772) == pytest.approx((0.05 - 0.4772) / 0.4772 * 100)
    with pytest.raises(ValueError, match="AUC"):
        privleak(1.2, 0.5)
    with pytest.raises(ValueError, match="undefined for a retain-model AUC of 1"):
        privleak(0.5, 1.0)


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
    assert s["muse/privleak_auc_flipped"] == pytest.approx(1 - s["muse/privleak_auc"])  # the AUC MUSE reports
    assert "muse/privleak" not in s and "no reference" in result.meta["muse/privleak_missing"]
    assert len(result.per_example["muse/verbmem_forget_rouge_f1"]) == N
    assert len(result.per_example["muse/privleak_holdout_min_k"]) == N

    # Zero-shot KnowMem asks in the training format, so the memorised model answers its forget questions.
    zero_shot = replace(data, knowmem_forget_qa_icl=Dataset.from_dict({"question": [], "answer": []}))
    evaluator = MUSEEvaluator(zero_shot, batch_size=N, max_new_tokens_knowmem=160)
    assert sum(evaluator.knowmem(_memorised, tokenizer, "forget")) / N > 0.9


def test_privleak_against_reference_runs(_memorised, tiny_llama, tokenizer, muse_dir, tmp_path):
    evaluator = MUSEEvaluator(
        MUSEDataset.load(data_dir=muse_dir).select(4), max_new_tokens_verbmem=4, max_new_tokens_knowmem=4, batch_size=N
    )
    with pytest.raises(KeyError, match="privleak_auc"):  # checked before any forward pass
        evaluator.evaluate(_memorised, tokenizer, EvaluationResult(summary={"tofu/forget_prob": 1.0}))
    with pytest.raises(ValueError, match="undefined for a retain-model AUC of 1"):  # also before any forward pass
        evaluator.evaluate(_memorised, tokenizer, EvaluationResult(summary={"muse/privleak_auc": 1.0}))
    # A model as its own reference (through the saved JSON) is exactly as private as the "retrain": 0. The random
    # tiny Llama, as the memorised model's AUC is 1 here, where PrivLeak is undefined.
    own = evaluator.evaluate(tiny_llama, tokenizer)
    own.save(tmp_path / "reference.json")
    again = evaluator.evaluate(tiny_llama, tokenizer, EvaluationResult.load(tmp_path / "reference.json"))
    assert again.summary["muse/privleak"] == 0.0
    hand = evaluator.evaluate(_memorised, tokenizer, EvaluationResult(summary={"muse/privleak_auc": 0.6}))
    flipped = 1 - hand.summary["muse/privleak_auc"]
    assert hand.summary["muse/privleak"] == pytest.approx((flipped - 0.4) / 0.4 * 100)
    assert hand.summary["muse/privleak"] < -50  # AUC > 0.9 against a retain AUC of 0.6: the forget set leaks


def _move(root: Path, config: str, old: str, new: str) -> None:
    (root / config / f"{old}.json").rename(root / config / f"{new}.json")


def test_loader_accepts_muse_github_names(muse_dir, tmp_path):
    hub = MUSEDataset.load(data_dir=muse_dir)
    assert hub.privleak_retain is None  # optional: the MUSE-shaped folder has no privleak/retain
    github = shutil.copytree(muse_dir, tmp_path / "news")
    _move(github, "knowmem", "retain_qa", "retain2_qa")
    _move(github, "knowmem", "retain_qa_icl", "retain2_qa_icl")
    (github / "privleak/retain2.json").write_text(json.dumps(["a retain text", "another one"]))  # MUSE's format
    data = MUSEDataset.load(data_dir=github)
    assert data.knowmem_retain_qa.to_list() == hub.knowmem_retain_qa.to_list()
    assert data.knowmem_retain_qa_icl.to_list() == hub.knowmem_retain_qa_icl.to_list()
    assert data.privleak_retain.to_list() == [{"text": "a retain text"}, {"text": "another one"}]

    shutil.copy(muse_dir / "knowmem/retain_qa.json", github / "knowmem/retain_qa.json")
    with pytest.raises(ValueError, match=r"knowmem/retain_qa\.json.*knowmem/retain2_qa\.json.*keep one"):
        MUSEDataset.load(data_dir=github)
    (github / "knowmem/retain_qa.json").unlink()
    (github / "knowmem/retain2_qa.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"knowmem/retain_qa\.json or knowmem/retain2_qa\.json"):
        MUSEDataset.load(data_dir=github)


def test_front_door_names():
    import erasus_hf
    from erasus_hf import MUSEDataset as FrontMUSE
    from erasus_hf import TOFUDataset as FrontTOFU
    from erasus_hf.data.tofu import TOFUDataset

    assert FrontMUSE is MUSEDataset and FrontTOFU is TOFUDataset
    assert {"MUSEDataset", "TOFUDataset"} <= set(erasus_hf.__all__)
