"""Exact memorization and extraction strength: hand-built predictions with their edge cases, and the memorised model
against a fresh one."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from erasus_hf.evaluation.memorization import MemorizationEvaluator, exact_memorization, extraction_strength
from erasus_hf.evaluation.scoring import TokenStats


def stats(targets: list[int], argmax: list[int], closing_eos: bool = False) -> TokenStats:
    n = len(targets)
    zeros, ones = torch.zeros(n), torch.ones(n)
    return TokenStats(zeros, torch.tensor(targets), torch.tensor(argmax), zeros, ones, closing_eos=closing_eos)


@pytest.mark.parametrize(
    ("argmax", "em", "es", "es_empty_suffix"),
    [
        ([5, 6, 7, 8], 1.0, 1.0, 1.0),  # all right: k* = 0
        ([5, 0, 7, 8], 0.75, 0.5, 0.5),  # last wrong at t=1: k* = 2, ES = 1 - 2/4
        ([0, 6, 7, 8], 0.75, 0.75, 0.75),  # only the first wrong: k* = 1
        ([5, 6, 7, 0], 0.75, 0.25, 0.0),  # last token wrong: open-unlearning's loop stops at k* = 3; literally 4
        ([0, 6, 0, 8], 0.5, 0.25, 0.25),  # wrong at 0 and 2: k* = 3
        ([0, 0, 0, 0], 0.0, 0.25, 0.0),  # nothing right: 1/|y| (reference) or 0
    ],
)
def test_exact_memorization_and_extraction_strength_by_hand(argmax, em, es, es_empty_suffix):
    s = stats([5, 6, 7, 8], argmax)
    assert exact_memorization(s) == pytest.approx(em)
    assert extraction_strength(s) == pytest.approx(es)
    assert extraction_strength(s, allow_empty_suffix=True) == pytest.approx(es_empty_suffix)


def test_single_token_and_empty_edge_cases():
    assert extraction_strength(stats([3], [3])) == 1.0
    assert extraction_strength(stats([3], [4])) == 1.0  # open-unlearning: k in range(1) never matches, k stays 0
    assert extraction_strength(stats([3], [4]), allow_empty_suffix=True) == 0.0
    assert exact_memorization(stats([3], [4])) == 0.0
    with pytest.raises(ValueError, match="at least one scored token"):
        extraction_strength(stats([], []))


def test_the_closing_eos_is_left_out_unless_score_eos():
    # answer tokens 5, 6, 7 then the EOS (2): the last answer token is wrong, the EOS right
    s = stats([5, 6, 7, 2], [5, 6, 0, 2], closing_eos=True)
    assert exact_memorization(s) == pytest.approx(2 / 3)
    assert exact_memorization(s, score_eos=True) == pytest.approx(3 / 4)
    assert extraction_strength(s) == pytest.approx(1 / 3)  # k* = 3 -> capped at |y| - 1 = 2
    assert extraction_strength(s, allow_empty_suffix=True) == 0.0
    assert extraction_strength(s, score_eos=True) == pytest.approx(1 / 4)  # k* = 3 of 4
    with pytest.raises(ValueError, match="score_eos=True"):
        exact_memorization(stats([2], [2], closing_eos=True))  # an empty answer: only the EOS


def test_memorised_model_memorises_its_forget_rows_and_fresh_model_does_not(
    memorised, tiny_llama, tokenizer, tofu_slice
):
    forget, retain = tofu_slice
    evaluator = MemorizationEvaluator({"forget": forget, "retain": retain}, batch_size=20)
    trained = evaluator.evaluate(memorised, tokenizer)
    fresh = evaluator.evaluate(tiny_llama, tokenizer)
    for split in ("forget", "retain"):
        for metric in ("exact_memorization", "extraction_strength"):
            key = f"memorization/{split}_{metric}"
            assert len(trained.per_example[key]) == 40
            assert trained.summary[key] == pytest.approx(sum(trained.per_example[key]) / 40)
    assert trained.summary["memorization/forget_exact_memorization"] > 0.9
    assert trained.summary["memorization/forget_extraction_strength"] > 0.8
    assert fresh.summary["memorization/forget_exact_memorization"] < 0.2
    assert fresh.summary["memorization/forget_extraction_strength"] < 0.2


def test_memorization_on_text_rows_and_bad_input(tiny_llama, tokenizer):
    texts = Dataset.from_dict({"text": ["The cat sat on the mat.", "Another line."]})
    result = MemorizationEvaluator({"web": texts}, name="mem").evaluate(tiny_llama, tokenizer)
    assert set(result.summary) == {"mem/web_exact_memorization", "mem/web_extraction_strength"}
    assert len(result.per_example["mem/web_exact_memorization"]) == 2
    with pytest.raises(ValueError, match="at least one split"):
        MemorizationEvaluator({})
    with pytest.raises(ValueError, match=r"Split 'bad' rows .* with 'question' but without 'answer'"):
        MemorizationEvaluator({"bad": Dataset.from_dict({"question": ["q"]})})
    with pytest.raises(ValueError, match="Split 'none' is empty"):
        MemorizationEvaluator({"none": texts.select([])})
