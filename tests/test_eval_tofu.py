"""TOFU metrics: hand computations of every formula, greedy generation, and the evaluator on the memorised model."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from erasus_hf.data.formatting import format_prompt
from erasus_hf.data.tofu import TOFUDataset, load_tofu, shared_tofu_dir
from erasus_hf.evaluation.generation import greedy_generate, rouge_f1, rouge_recall
from erasus_hf.evaluation.likelihood import truth_ratio, truth_ratio_score
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.evaluation.suite import MetricSuite
from erasus_hf.evaluation.tofu import (
    TOFUEvaluator,
    forget_ks_statistic,
    forget_quality,
    harmonic_mean,
    normalised_probability,
)

GEN_TOKENS = 160
"""The slice's answers run to 137 tokens with the 512-token test tokenizer; 160 new tokens let every one finish."""


def nll(p: float) -> float:
    return -math.log(p)


# ---------------------------------------------------------------- hand computations


def test_rouge_l_hand_computed():
    # Reference 6 tokens, prediction its first 3: LCS 3 -> recall 3/6, precision 3/3, F1 2*0.5*1/1.5.
    assert rouge_recall("the cat sat", "the cat sat on the mat") == pytest.approx(0.5)
    assert rouge_f1("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # A subsequence, not a substring: pred [cat, the, mat], ref [the, cat, on, mat] -> LCS 2 ("cat mat").
    # recall 2/4, precision 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7.
    assert rouge_recall("cat the mat", "the cat on mat") == pytest.approx(0.5)
    assert rouge_f1("cat the mat", "the cat on mat") == pytest.approx(4 / 7)
    # Stemming and case folding: "Cats were running." -> [cat, were, run]; ref [cat, run]: recall 1, precision 2/3.
    assert rouge_recall("Cats were running.", "cat run") == pytest.approx(1.0)
    assert rouge_f1("Cats were running.", "cat run") == pytest.approx(0.8)
    assert rouge_recall("", "the cat") == 0.0
    with pytest.raises(TypeError):
        rouge_recall(None, "the cat")


def test_normalised_probability_hand_computed():
    true_nll = torch.tensor([nll(0.5), nll(0.2)], dtype=torch.float64)
    wrong_nll = torch.tensor([[nll(0.25), nll(0.25)], [nll(0.1), nll(0.3)]], dtype=torch.float64)
    # 0.5 / (0.5 + 0.25 + 0.25) = 0.5;  0.2 / (0.2 + 0.1 + 0.3) = 1/3
    assert normalised_probability(true_nll, wrong_nll).tolist() == pytest.approx([0.5, 1 / 3])
    with pytest.raises(ValueError, match="must be"):
        normalised_probability(true_nll, wrong_nll[0])


def test_truth_ratio_aggregates_hand_computed():
    # Row 1: P_true 0.5, perturbed P 0.25 and 1.0 -> geometric mean 0.5 -> TR = 1.
    # Row 2: P_true 0.8, perturbed 0.2, 0.2 -> TR = 0.25.   Row 3: P_true 0.1, perturbed 0.4, 0.4 -> TR = 4.
    true_nll = torch.tensor([nll(0.5), nll(0.8), nll(0.1)], dtype=torch.float64)
    perturbed = torch.tensor([[nll(0.25), nll(1.0)], [nll(0.2), nll(0.2)], [nll(0.4), nll(0.4)]], dtype=torch.float64)
    ratios = truth_ratio(true_nll, perturbed)
    assert ratios.tolist() == pytest.approx([1.0, 0.25, 4.0])
    # forget: mean(min(TR, 1/TR)) = (1 + 0.25 + 0.25) / 3;  others: mean(max(0, 1 - TR)) = (0 + 0.75 + 0) / 3
    assert truth_ratio_score(ratios, forget=True) == pytest.approx(0.5)
    assert truth_ratio_score(ratios, forget=False) == pytest.approx(0.25)


def test_harmonic_mean_hand_computed():
    assert harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert harmonic_mean([0.4]) == pytest.approx(0.4)
    assert harmonic_mean([0.9, 0.0, 0.5]) == 0.0
    with pytest.raises(ValueError, match="no values"):
        harmonic_mean([])
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([0.5, -0.1])


def test_forget_quality_ks_p_value():
    sample = [0.3, 0.9, 1.2, 0.5, 2.0]
    assert forget_quality(sample, list(sample)) == 1.0
    # Disjoint samples of 5 and 5: D = 1, exact two-sided p = 2 / C(10, 5) = 2/252.
    assert forget_quality([1, 2, 3, 4, 5], [11, 12, 13, 14, 15]) == pytest.approx(2 / math.comb(10, 5))
    assert forget_quality([0.01 * i for i in range(50)], [10 + 0.01 * i for i in range(50)]) < 1e-20
    with pytest.raises(ValueError, match="both sides"):
        forget_quality([], [1.0])


def test_forget_ks_statistic_is_the_largest_gap_of_the_two_empirical_distributions():
    assert forget_ks_statistic([0.3, 0.9, 1.2], [0.3, 0.9, 1.2]) == 0.0
    assert forget_ks_statistic([1, 2, 3, 4, 5], [11, 12, 13, 14, 15]) == 1.0
    # F(x) of [1, 2, 3, 4] and of [3, 4, 5, 6]: at x = 2 the first is 2/4, the second 0: D = 0.5
    assert forget_ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    # where the p-value saturates, D still tells two near-identical samples apart
    base = list(range(40))
    near, nearer = [x + 3 for x in base], [x + 1 for x in base]
    assert forget_quality(near, base) > 0.99 and forget_quality(nearer, base) > 0.99
    assert forget_ks_statistic(near, base) == pytest.approx(3 / 40) and forget_ks_statistic(nearer, base) == 1 / 40


# ---------------------------------------------------------------- data


def test_tofu_dataset_validation(tofu_slice):
    forget, retain = tofu_slice
    with pytest.raises(ValueError, match=r"lacks the columns \['paraphrased_answer'\].*it has"):
        TOFUDataset(forget=forget.remove_columns("paraphrased_answer"))
    uneven = Dataset.from_dict(
        {"question": ["q1", "q2"], "answer": ["a", "b"], "perturbed_answer": [["x"], ["y", "z"]]}
    )
    with pytest.raises(ValueError, match="same, non-zero number of perturbed answers"):
        TOFUDataset(world_facts=uneven)
    with pytest.raises(ValueError, match="at least one"):
        TOFUDataset()
    data = TOFUDataset(forget=forget, retain=retain, forget_split="forget01").select(3)
    assert list(data.splits()) == ["forget", "retain"] and len(data.forget) == 3 and len(data.retain) == 3
    assert data.forget_split == "forget01"
    with pytest.raises(ValueError, match="subset"):
        TOFUDataset.load(splits=("forget", "holdout"), data_dir=".")


def test_tofu_dataset_load_shared():
    data_dir = shared_tofu_dir()
    if data_dir is None:
        pytest.skip("the full TOFU data (../shared/data/tofu) is not on this machine")
    data = TOFUDataset.load("forget10", data_dir=data_dir)
    sizes = {split: len(d) for split, d in data.splits().items()}
    assert sizes == {"forget": 400, "retain": 400, "real_authors": 100, "world_facts": 117}
    assert len(data.forget[0]["perturbed_answer"]) == 5 and len(data.world_facts[0]["perturbed_answer"]) == 3
    subset = TOFUDataset.load("forget01", data_dir=data_dir, splits=("forget",)).select(7)
    assert list(subset.splits()) == ["forget"] and len(subset.forget) == 7


# ---------------------------------------------------------------- generation


def test_greedy_generate_left_padding_and_recall(memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    # Prompts of different lengths, so the batch really is padded.
    questions = list(forget["question"][:4]) + list(retain["question"][:4])
    prompts = [format_prompt(q) for q in questions]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    batched = greedy_generate(memorised, tokenizer, prompts, max_new_tokens=24, batch_size=8)
    single = [greedy_generate(memorised, tokenizer, [p], max_new_tokens=24, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert tokenizer.padding_side == "right"  # the training tokenizer is left as it was
    answer = greedy_generate(memorised, tokenizer, [prompts[0]], max_new_tokens=GEN_TOKENS)[0]
    assert answer == forget[0]["answer"].strip()


def test_generation_stops_each_row_at_eos_and_the_batch_once_all_rows_have(_memorised, tokenizer, tofu_slice):
    forget, _ = tofu_slice
    rows = forget.select(range(4))  # answers of different lengths
    prompts = [format_prompt(q) for q in rows["question"]]
    lengths = [len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for a in rows["answer"]]
    assert len(set(lengths)) > 1
    calls = []
    hook = _memorised.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = greedy_generate(_memorised, tokenizer, prompts, max_new_tokens=200, batch_size=4)
    finally:
        hook.remove()
    # the memorised answers, nothing after each row's EOS (the shorter rows are padded while the longest finishes)
    assert out == [a.strip() for a in rows["answer"]]
    # one forward per new token until the longest answer's EOS, not 200
    assert len(calls) == max(lengths) + 1


def test_tofu_generation_settings_default_to_open_unlearning_and_pass_through_the_suite(
    tiny_llama, tokenizer, tofu_slice
):
    forget, _ = tofu_slice
    data = TOFUDataset(forget=forget.select(range(3)), forget_split="forget01")
    evaluator = TOFUEvaluator(data, batch_size=16)
    assert (evaluator.max_new_tokens, evaluator.generation_batch_size) == (200, 16)
    result = MetricSuite(["tofu"], max_new_tokens=3, generation_batch_size=2).run(tiny_llama, tokenizer, tofu=data)
    assert result.meta["tofu/generation"] == {"max_new_tokens": 3, "batch_size": 2, "greedy": True}
    assert len(result.per_example["tofu/forget_rouge"]) == 3
    with pytest.raises(ValueError, match="max_new_tokens is given twice"):
        MetricSuite(["tofu"], options={"tofu": {"max_new_tokens": 5}}, max_new_tokens=3)
    with pytest.raises(ValueError, match="generation_batch_size"):
        TOFUEvaluator(data, generation_batch_size=0)


# ---------------------------------------------------------------- the evaluator


def _slice_data(tofu_slice, n_facts: int = 10) -> TOFUDataset:
    forget, retain = tofu_slice
    facts = {}
    if shared_tofu_dir() is not None:
        for split in ("real_authors", "world_facts"):
            rows = load_tofu(f"{split}_perturbed", data_dir=shared_tofu_dir())
            facts[split] = rows.select(range(n_facts))
    return TOFUDataset(forget=forget, retain=retain, forget_split="forget01", **facts)


@pytest.fixture(scope="module")
def slice_result(_memorised, tokenizer, tofu_slice):
    """One evaluation of the memorised model (evaluation leaves the model as it was, so the session model serves)."""
    evaluator = TOFUEvaluator(_slice_data(tofu_slice), batch_size=32, max_new_tokens=GEN_TOKENS)
    return evaluator.evaluate(_memorised, tokenizer)


def test_tofu_evaluator_on_memorised_model(slice_result):
    s = slice_result.summary
    assert s["tofu/forget_prob"] > 0.9
    assert s["tofu/forget_rouge"] > 0.8
    assert s["tofu/retain_prob"] > 0.9 and s["tofu/retain_rouge"] > 0.8
    # The model memorised the answers' wording, not the paraphrases: its truth ratios are not extreme either way.
    for split in ("forget", "retain"):
        ratios = slice_result.per_example[f"tofu/{split}_truth_ratio"]
        assert 0 < s[f"tofu/{split}_truth_ratio"] < 1 and all(r > 0 for r in ratios)
    forget_ratios = torch.tensor(slice_result.per_example["tofu/forget_truth_ratio"])
    assert s["tofu/forget_truth_ratio"] == pytest.approx(torch.minimum(forget_ratios, 1 / forget_ratios).mean().item())
    assert len(slice_result.per_example["tofu/forget_truth_ratio"]) == 40
    assert "tofu/forget_quality" not in s
    assert "no reference" in slice_result.meta["tofu/forget_quality_missing"]
    components = slice_result.meta["tofu/model_utility_components"]
    expected = ["tofu/retain_prob", "tofu/retain_rouge", "tofu/retain_truth_ratio"]
    if shared_tofu_dir() is not None:
        expected += [f"tofu/{split}_{m}" for split in ("real_authors", "world_facts") for m in ("prob", "rouge")]
        expected += [f"tofu/{split}_truth_ratio" for split in ("real_authors", "world_facts")]
        # Normalised prob of 1 true + 3 wrong answers lies in (0, 1).
        assert 0 < s["tofu/real_authors_prob"] < 1 and len(slice_result.per_example["tofu/world_facts_rouge"]) == 10
    assert sorted(components) == sorted(expected)
    assert s["tofu/model_utility"] == pytest.approx(harmonic_mean([s[c] for c in components]))
    # Per-example logs average to the summary.
    assert s["tofu/forget_prob"] == pytest.approx(sum(slice_result.per_example["tofu/forget_prob"]) / 40)


def test_forget_quality_against_own_json_is_one(slice_result, _memorised, tokenizer, tofu_slice, tmp_path):
    path = tmp_path / "reference.json"
    slice_result.save(path)
    reference = EvaluationResult.load(path)
    forget, _ = tofu_slice
    evaluator = TOFUEvaluator(TOFUDataset(forget=forget, forget_split="forget01"), max_new_tokens=4)
    result = evaluator.evaluate(_memorised, tokenizer, reference=reference)
    assert result.summary["tofu/forget_quality"] == 1.0
    assert "tofu/model_utility" not in result.summary and "tofu/model_utility_missing" in result.meta
    with pytest.raises(KeyError, match="forget_truth_ratio"):
        evaluator.evaluate(_memorised, tokenizer, reference=EvaluationResult(per_example={"other": [1.0]}))
    wrong_split = EvaluationResult(meta={"tofu/forget_split": "forget10"})
    with pytest.raises(ValueError, match="forget split"):
        evaluator.evaluate(_memorised, tokenizer, reference=wrong_split)


def test_batch_size_one_gives_the_same_numbers(_memorised, tokenizer, tofu_slice):
    data = _slice_data(tofu_slice, n_facts=3).select(3)
    batched = TOFUEvaluator(data, batch_size=16, max_new_tokens=24).evaluate(_memorised, tokenizer)
    single = TOFUEvaluator(data, batch_size=1, max_new_tokens=24).evaluate(_memorised, tokenizer)
    assert batched.summary.keys() == single.summary.keys()
    for key, value in batched.summary.items():
        assert single.summary[key] == pytest.approx(value, abs=1e-4), key
    for key, values in batched.per_example.items():
        assert single.per_example[key] == pytest.approx(values, abs=1e-4, rel=1e-4), key
