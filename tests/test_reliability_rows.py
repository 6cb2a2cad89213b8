"""Issue 15, part "rows": a reference must describe the same rows, and statistics with too little data say so.

A reference (the retain model's evaluation JSON) is refused when it scored other rows than this evaluation, before
any forward pass: TOFU forget quality, MUSE PrivLeak, `MetricSuite`, `UnlearningEarlyStoppingCallback` inside
`UnlearningTrainer`, `erasus-hf evaluate --reference`. A JSON without row fingerprints is compared by counts, with a
warning. Membership-inference AUCs refuse an empty side, warn below 20 rows a side and carry a seeded, stratified
percentile-bootstrap confidence interval, shown on the model card.

`NoForward` stands in for the model wherever a check must come first: any forward pass fails the test.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from torch import nn

from erasus_hf import UnlearningTrainer
from erasus_hf.cli import main
from erasus_hf.data.muse import MUSEDataset, load_muse_split
from erasus_hf.data.tofu import TOFUDataset, load_tofu
from erasus_hf.evaluation.callbacks import UnlearningEarlyStoppingCallback
from erasus_hf.evaluation.mia import MIAEvaluator
from erasus_hf.evaluation.muse import MUSEEvaluator
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.evaluation.suite import MetricSuite
from erasus_hf.evaluation.tofu import TOFUEvaluator

from .testing_utils import config, qa

COUNT_ONLY = "only row counts could be compared"


class NoForward(nn.Module):
    """A model whose forward pass fails the test: what runs before the reference check shows up."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, *args, **kwargs):
        raise AssertionError("a forward pass ran before the reference was checked")


def _tofu(rows: Dataset, n: int | None = None, split: str = "forget01") -> TOFUDataset:
    return TOFUDataset(forget=rows if n is None else rows.select(range(n)), forget_split=split)


@pytest.fixture(scope="module")
def unseen(tofu_slice):
    """20 rows of demo_retain authors the session's models never trained on."""
    _, retain = tofu_slice
    rows = load_tofu("demo_retain").filter(lambda a: a >= 2, input_columns="author").select(range(20))
    assert not set(rows["author"]) & set(retain["author"])
    return rows


@pytest.fixture
def reference_on_3(tofu_slice, tiny_llama, tokenizer, tmp_path):
    """The retain-model run of forget quality, evaluated on the first 3 forget rows, read back from its JSON."""
    forget, _ = tofu_slice
    TOFUEvaluator(_tofu(forget, 3), rouge=False).evaluate(tiny_llama, tokenizer).save(tmp_path / "retain_eval.json")
    return EvaluationResult.load(tmp_path / "retain_eval.json")


# ---- 6. a reference must describe the same rows ------------------------------------------------------------------


def test_forget_quality_refuses_a_reference_evaluated_on_fewer_rows(reference_on_3, tofu_slice, tokenizer, tmp_path):
    forget, _ = tofu_slice
    evaluator = TOFUEvaluator(_tofu(forget, 6), rouge=False)
    with pytest.raises(ValueError) as error:
        evaluator.evaluate(NoForward(), tokenizer, reference=reference_on_3)
    message = str(error.value)
    assert message.startswith("Forget quality: The reference evaluation (") and "retain_eval.json" in message
    assert "'tofu/forget' rows" in message
    assert "the reference has 3 rows, this evaluation 6: rows 0-2 agree, this evaluation has 3 more from row 3" in (
        message
    )
    assert "same --max_examples" in message


def test_forget_quality_refuses_other_rows_once_the_split_tag_is_gone(tofu_slice, tiny_llama, tokenizer):
    forget, _ = tofu_slice
    reference = TOFUEvaluator(_tofu(forget.select(range(6, 12))), rouge=False).evaluate(tiny_llama, tokenizer)
    del reference.meta["tofu/forget_split"]  # an edited JSON: nothing but the rows says which split it was
    with pytest.raises(ValueError, match="both have 6 rows but 6 differ; the first differing row is row 0"):
        TOFUEvaluator(_tofu(forget, 6), rouge=False).evaluate(NoForward(), tokenizer, reference=reference)
    one_changed = forget.select(range(6)).map(lambda r, i: {"answer": r["answer"] + "!" * (i == 4)}, with_indices=True)
    reference = TOFUEvaluator(_tofu(one_changed), rouge=False).evaluate(tiny_llama, tokenizer)
    with pytest.raises(ValueError, match="both have 6 rows but 1 differ; the first differing row is row 4"):
        TOFUEvaluator(_tofu(forget, 6), rouge=False).evaluate(NoForward(), tokenizer, reference=reference)


def test_the_same_rows_in_another_order_or_with_extra_columns_are_the_same_rows(tofu_slice, tiny_llama, tokenizer):
    forget, _ = tofu_slice
    rows = forget.select(range(6))
    reference = TOFUEvaluator(_tofu(rows), rouge=False).evaluate(tiny_llama, tokenizer)
    shuffled = rows.select([5, 4, 3, 2, 1, 0]).add_column("id", list(range(6)))  # the KS test is blind to order
    result = TOFUEvaluator(_tofu(shuffled), rouge=False).evaluate(tiny_llama, tokenizer, reference=reference)
    assert result.summary["tofu/forget_quality"] == 1.0
    assert result.rows["tofu/forget"]["columns"] == ["answer", "paraphrased_answer", "perturbed_answer", "question"]


def test_a_json_without_fingerprints_is_compared_by_count_with_a_warning(
    reference_on_3, tofu_slice, tiny_llama, tokenizer, tmp_path
):
    forget, _ = tofu_slice
    old = reference_on_3.to_dict()
    del old["rows"], old["intervals"]  # what erasus-hf wrote before this issue
    (tmp_path / "old.json").write_text(json.dumps(old))
    reference = EvaluationResult.load(tmp_path / "old.json")
    assert reference.rows == {} and reference.row_count("tofu/forget") == 3
    with pytest.warns(UserWarning, match=rf"{COUNT_ONLY} \(reference vs this evaluation: tofu/forget: 3 vs 3 rows\)"):
        result = TOFUEvaluator(_tofu(forget, 3), rouge=False).evaluate(tiny_llama, tokenizer, reference=reference)
    assert result.summary["tofu/forget_quality"] == 1.0
    with pytest.raises(ValueError, match="old.json\\) scored 3 'tofu/forget' rows, this evaluation 6"):
        TOFUEvaluator(_tofu(forget, 6), rouge=False).evaluate(NoForward(), tokenizer, reference=reference)


def test_the_evaluation_json_round_trips_rows_and_intervals(tofu_slice, unseen, tiny_llama, tokenizer, tmp_path):
    from erasus_hf.data.fingerprint import describe_rows

    forget, _ = tofu_slice
    result = MetricSuite(["tofu", "mia"], options={"tofu": {"rouge": False}}).run(
        tiny_llama, tokenizer, tofu=_tofu(forget, 4), holdout=unseen.select(range(5))
    )
    result.save(tmp_path / "eval.json")
    loaded = EvaluationResult.load(tmp_path / "eval.json")
    assert loaded == result and loaded.source == str(tmp_path / "eval.json")
    assert sorted(loaded.rows) == ["mia/members", "mia/nonmembers", "tofu/forget"]
    assert loaded.rows["mia/nonmembers"] == describe_rows(unseen.select(range(5)), ["question", "answer"])
    assert loaded.rows["tofu/forget"]["count"] == 4 and len(loaded.rows["tofu/forget"]["row_sha256"]) == 4
    assert set(loaded.intervals) == {key for key in loaded.summary if key.startswith("mia/")}


def test_privleak_refuses_a_reference_scored_on_other_holdout_texts(tofu_slice, unseen, tokenizer):
    reference_data = _muse(tofu_slice, unseen.select(range(4)))
    reference = EvaluationResult(summary={"muse/privleak_auc": 0.5}, rows=MUSEEvaluator(reference_data).rows())
    evaluator = MUSEEvaluator(_muse(tofu_slice, unseen.select(range(4, 8))))
    with pytest.raises(ValueError) as error:
        evaluator.evaluate(NoForward(), tokenizer, reference=reference)
    assert str(error.value).startswith(
        "PrivLeak: The reference evaluation did not score the same 'muse/privleak_holdout'"
    )
    assert "both have 4 rows but 4 differ; the first differing row is row 0" in str(error.value)
    with pytest.warns(UserWarning, match=f"PrivLeak: .*{COUNT_ONLY}.*muse/privleak_forget: unknown vs 4 rows"):
        evaluator.check_reference(EvaluationResult(summary={"muse/privleak_auc": 0.5}))  # a hand-made reference


def test_metric_suite_checks_every_reference_before_the_first_forward_pass(
    reference_on_3, tofu_slice, unseen, tokenizer
):
    forget, _ = tofu_slice
    suite = MetricSuite(["mia", "tofu"], options={"tofu": {"rouge": False}})  # mia runs first
    with pytest.raises(ValueError, match="Forget quality: .*the reference has 3 rows, this evaluation 6"):
        suite.run(NoForward(), tokenizer, tofu=_tofu(forget, 6), holdout=unseen, reference=reference_on_3)


def test_trainer_refuses_other_rows_for_early_stopping_and_forget_quality_before_training(
    reference_on_3, tofu_slice, tiny_llama, tokenizer, tmp_path
):
    forget, _ = tofu_slice
    args = config(tmp_path, strategy="ga", max_steps=2, eval_strategy="steps", eval_steps=1)
    common = dict(
        forget_dataset=qa(forget),
        processing_class=tokenizer,
        evaluators=MetricSuite(["tofu"], options={"tofu": {"rouge": False}}),
        evaluation_data={"tofu": _tofu(forget, 6)},
    )
    stopper = UnlearningEarlyStoppingCallback("tofu/forget_truth_ratio", tolerance=0.05, reference=reference_on_3)
    with pytest.raises(ValueError, match="Early stopping on 'tofu/forget_truth_ratio': .*3 rows, this evaluation 6"):
        UnlearningTrainer(tiny_llama, args, callbacks=[stopper], **common)
    with pytest.raises(ValueError, match="Forget quality: .*3 rows, this evaluation 6"):
        UnlearningTrainer(tiny_llama, args, evaluation_reference=reference_on_3, **common)
    # the same rows pass, and a numeric target has nothing to check
    same = UnlearningEarlyStoppingCallback("tofu/forget_truth_ratio", tolerance=0.05, reference=reference_on_3)
    UnlearningTrainer(tiny_llama, args, callbacks=[same], **{**common, "evaluation_data": {"tofu": _tofu(forget, 3)}})
    UnlearningTrainer(tiny_llama, args, callbacks=[UnlearningEarlyStoppingCallback("x/y", 0.1, target=1.0)], **common)


@pytest.fixture
def tofu_folder(tmp_path, tofu_slice, tiny_llama, tokenizer):
    """A saved tiny model and a TOFU-shaped folder (6-row sets, an empty holdout file)."""
    forget, retain = (d.select(range(6)) for d in tofu_slice)
    model_dir, data_dir = tmp_path / "model", tmp_path / "tofu"
    tiny_llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir()
    forget.to_json(data_dir / "forget01_perturbed.json")
    for split in ("retain", "real_authors", "world_facts"):
        retain.to_json(data_dir / f"{split}_perturbed.json")
    (data_dir / "holdout01.json").write_text("")
    return model_dir, data_dir


def test_cli_evaluate_refuses_a_reference_of_other_rows_before_loading_the_model(
    tofu_folder, tiny_llama, tokenizer, tmp_path, monkeypatch
):
    model_dir, data_dir = tofu_folder
    small = TOFUDataset.load("forget01", data_dir=data_dir).select(3)
    TOFUEvaluator(small, rouge=False).evaluate(tiny_llama, tokenizer).save(tmp_path / "retain_eval.json")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the reference was checked")

    monkeypatch.setattr("erasus_hf.scripts.evaluate.load_model", no_model)
    argv = ["evaluate", "--model", str(model_dir), "--data_dir", str(data_dir), "--forget_split", "forget01"]
    argv += ["--reference", str(tmp_path / "retain_eval.json"), "--output", str(tmp_path / "eval.json")]
    with pytest.raises(
        ValueError, match="retain_eval.json\\) did not score the same 'tofu/forget' rows.*3 rows, this"
    ):
        main(argv)
    assert not (tmp_path / "eval.json").exists()


# ---- 7. statistics with too little data --------------------------------------------------------------------------


def test_an_empty_holdout_file_is_refused_naming_the_option_and_the_file(tofu_folder, tmp_path):
    model_dir, data_dir = tofu_folder
    with pytest.raises(ValueError, match="holdout01.json is empty: it holds no rows"):
        load_tofu("holdout01", data_dir=data_dir)
    argv = ["evaluate", "--model", str(model_dir), "--data_dir", str(data_dir), "--forget_split", "forget01"]
    argv += ["--benchmark", "mia", "--holdout_split", "holdout01", "--output", str(tmp_path / "eval.json")]
    with pytest.raises(ValueError, match=r"--holdout_split 'holdout01' \(the non-members of mia\): .*holdout01.json"):
        main(argv)


def test_an_empty_muse_file_is_refused_naming_it(tmp_path):
    (tmp_path / "privleak").mkdir()
    (tmp_path / "privleak" / "holdout.json").write_text("\n")
    with pytest.raises(ValueError, match="privleak/holdout.json is empty"):
        load_muse_split("privleak", "holdout", data_dir=tmp_path)


def test_an_empty_mia_side_is_refused_naming_the_side(tofu_slice):
    forget, _ = tofu_slice
    with pytest.raises(ValueError, match=r"the non-members dataset is empty \(`nonmembers`: the holdout"):
        MIAEvaluator(forget, forget.select([]))
    with pytest.raises(ValueError, match=r"the members dataset is empty \(`members`: the forget set\)"):
        MIAEvaluator(forget.select([]), forget)


def test_one_row_a_side_warns_and_gets_the_whole_interval(tofu_slice, unseen, tiny_llama, tokenizer):
    forget, _ = tofu_slice
    evaluator = MIAEvaluator(forget.select([0]), unseen.select([0]), attacks=("loss", "min_k"))
    with pytest.warns(
        UserWarning, match=r"only 1 member row, 1 non-member row \(fewer than 20 a side\).* 0, 0.5 or 1"
    ):
        result = evaluator.evaluate(tiny_llama, tokenizer)
    for attack in ("loss", "min_k"):
        assert result.summary[f"mia/{attack}_auc"] in (0.0, 0.5, 1.0)
        interval = result.intervals[f"mia/{attack}_auc"]
        assert (interval["low"], interval["high"]) == (0.0, 1.0)  # one row cannot be resampled: nothing is known
    with pytest.warns(UserWarning, match=r"only 1 non-member row \(fewer"):  # 40 members, 1 holdout row
        result = MIAEvaluator(forget, unseen.select([0]), attacks=("loss",)).evaluate(tiny_llama, tokenizer)
    assert (result.intervals["mia/loss_auc"]["low"], result.intervals["mia/loss_auc"]["high"]) == (0.0, 1.0)


def test_every_auc_has_a_seeded_stratified_percentile_bootstrap_interval(tofu_slice, unseen, tiny_llama, tokenizer):
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    forget, _ = tofu_slice
    evaluator = MIAEvaluator(forget.select(range(20)), unseen, attacks=("loss", "zlib", "min_k"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 20 rows a side: no warning
        result = evaluator.evaluate(tiny_llama, tokenizer)
    assert (
        MIAEvaluator(forget.select(range(20)), unseen, attacks=("loss",))
        .evaluate(tiny_llama, tokenizer)
        .intervals["mia/loss_auc"]
        == result.intervals["mia/loss_auc"]
    )  # seeded: the same interval again
    for attack in ("loss", "zlib", "min_k"):
        members = np.array(result.per_example[f"mia/{attack}_members"])
        nonmembers = np.array(result.per_example[f"mia/{attack}_nonmembers"])
        interval = result.intervals[f"mia/{attack}_auc"]
        assert interval["level"] == 0.95 and interval["resamples"] == 1000 and interval["seed"] == 0
        assert interval["low"] <= result.summary[f"mia/{attack}_auc"] <= interval["high"]
        if attack != "loss":
            continue

        def sklearn_auc(m, n):  # each side resampled on its own: both classes in every resample
            return roc_auc_score([1] * len(m) + [0] * len(n), np.concatenate([m, n]))

        expected = bootstrap(
            (members, nonmembers),
            sklearn_auc,
            n_resamples=1000,
            batch=100,
            vectorized=False,
            paired=False,
            method="percentile",
            rng=np.random.default_rng(0),
        ).confidence_interval
        assert (interval["low"], interval["high"]) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_the_auc_interval_counts_ties_as_scikit_learn_does():
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    from erasus_hf.evaluation.mia import auc_interval

    members, nonmembers = np.array([1.0, 2, 2, 3, 3, 3]), np.array([0.0, 1, 2, 2, 3])

    def sklearn_auc(m, n):
        return roc_auc_score([1] * len(m) + [0] * len(n), np.concatenate([m, n]))

    expected = bootstrap(
        (members, nonmembers), sklearn_auc, n_resamples=300, batch=100, vectorized=False, method="percentile", rng=7
    ).confidence_interval
    assert auc_interval(members, nonmembers, resamples=300, seed=7) == pytest.approx((expected.low, expected.high))


def _muse(tofu_slice, holdout: Dataset) -> MUSEDataset:
    """MUSE-shaped data from TOFU rows: 4 of each part; privleak forget = forget texts, holdout = `holdout`."""
    forget, retain = (d.select(range(4)) for d in tofu_slice)
    text = lambda rows: Dataset.from_dict({"text": [f"{q} {a}" for q, a in zip(rows["question"], rows["answer"])]})  # noqa: E731
    empty = Dataset.from_dict({"question": [], "answer": []})
    return MUSEDataset(
        verbmem_forget=Dataset.from_dict({"prompt": forget["question"], "gt": forget["answer"]}),
        knowmem_forget_qa=qa(forget),
        knowmem_retain_qa=qa(retain),
        knowmem_forget_qa_icl=empty,
        knowmem_retain_qa_icl=empty,
        privleak_forget=text(forget),
        privleak_holdout=text(holdout),
    )


def test_privleak_auc_has_an_interval_and_few_texts_warn(tofu_slice, unseen, tiny_llama, tokenizer):
    evaluator = MUSEEvaluator(_muse(tofu_slice, unseen.select(range(4))), 2, 2, batch_size=4)
    with pytest.warns(UserWarning, match="MUSE PrivLeak: only 4 privleak forget rows, 4 privleak holdout rows"):
        result = evaluator.evaluate(tiny_llama, tokenizer)
    auc, flipped = result.intervals["muse/privleak_auc"], result.intervals["muse/privleak_auc_flipped"]
    assert auc["low"] <= result.summary["muse/privleak_auc"] <= auc["high"]
    assert (flipped["low"], flipped["high"]) == pytest.approx((1 - auc["high"], 1 - auc["low"]))
    assert sorted(result.rows)[-2:] == ["muse/privleak_holdout", "muse/verbmem_forget"]


def test_the_model_card_shows_each_interval_in_the_evaluation_table():
    from erasus_hf.hub.card import build_model_card

    interval = {"low": 0.61, "high": 0.9, "level": 0.95, "method": "percentile bootstrap", "resamples": 1000}
    evaluation = EvaluationResult(
        summary={"mia/loss_auc": 0.75, "tofu/forget_prob": 0.5}, intervals={"mia/loss_auc": {**interval, "seed": 0}}
    )
    card = build_model_card(
        strategy_name="ga",
        paper="p",
        hyperparameters={},
        training_args={},
        forget_rows=[{"question": "q", "answer": "a"}],
        retain_count=None,
        base_model=None,
        is_adapter=False,
        evaluation=evaluation,
        reference_note="none",
        command=None,
        datasets=None,
        model_name="m",
    )
    assert "| `mia/loss_auc` | 0.75 (95% CI 0.61 to 0.9) |" in card.content
    assert "| `tofu/forget_prob` | 0.5 |" in card.content
    assert [r.metric_value for r in card.data.eval_results] == [0.75, 0.5]  # model-index: the values only
