"""Evaluators inside training: logged at eval steps, best-checkpoint selection, early stopping at a target band."""

import json

import pytest
import torch

from erasus_hf import UnlearningTrainer
from erasus_hf.evaluation.callbacks import UnlearningEarlyStoppingCallback
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.evaluation.scoring import qa_batches, token_stats
from erasus_hf.evaluation.suite import MetricSuite

from .testing_utils import config, nll, qa


class ProbeEvaluator:
    """Mean answer NLL of the forget and retain rows (a minimal evaluator: the trainer plumbing is under test)."""

    name = "probe"

    def __init__(self, forget, retain):
        self.forget, self.retain = forget, retain
        self.calls = 0

    def evaluate(self, model, tokenizer, reference=None):
        self.calls += 1
        summary = {}
        for side, rows in (("forget", self.forget), ("retain", self.retain)):
            stats = token_stats(model, qa_batches(tokenizer, rows["question"], rows["answer"]))
            summary[f"probe/{side}_nll"] = sum(s.nll for s in stats) / len(stats)
        return EvaluationResult(summary=summary)


def test_evaluators_run_at_eval_steps_and_pick_the_best_checkpoint(tmp_path, tokenizer, memorised, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    probe = ProbeEvaluator(forget, retain)
    args = config(
        tmp_path,
        strategy="ga",
        use_peft=True,
        learning_rate=1e-2,
        max_steps=4,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        metric_for_best_model="probe/retain_nll",
        greater_is_better=False,
        load_best_model_at_end=True,
    )
    trainer = UnlearningTrainer(memorised, args, forget_dataset=forget, processing_class=tokenizer, evaluators=[probe])
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_probe/retain_nll" in h]
    assert probe.calls == 4 and [h["step"] for h in evals] == [1, 2, 3, 4]
    forget_nll = [h["eval_probe/forget_nll"] for h in evals]
    assert forget_nll[-1] > forget_nll[0] + 0.5  # gradient ascent: the forget NLL rises
    retain_nll = [h["eval_probe/retain_nll"] for h in evals]
    best = min(range(4), key=retain_nll.__getitem__)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best + 1}")
    assert retain_nll[best] < retain_nll[-1] - 1e-3
    # the model at the end is the best checkpoint's, not the last step's
    assert nll(trainer.model, tokenizer, retain) == pytest.approx(retain_nll[best], rel=1e-4)
    assert json.loads((tmp_path / "out" / f"checkpoint-{best + 1}" / "strategy.json").read_text())["name"] == "ga"


def test_early_stopping_once_the_forget_metric_reaches_the_target_band(tmp_path, tokenizer, memorised, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    reference = EvaluationResult(summary={"probe/forget_nll": 1.5})  # as if read from the retain model's JSON
    reference.save(tmp_path / "retain_eval.json")
    stopper = UnlearningEarlyStoppingCallback(
        "probe/forget_nll", tolerance=1.0, reference=tmp_path / "retain_eval.json"
    )
    args = config(
        tmp_path,
        strategy="ga",
        learning_rate=1e-3,
        max_steps=30,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=1,
    )
    trainer = UnlearningTrainer(
        memorised,
        args,
        forget_dataset=forget,
        processing_class=tokenizer,
        evaluators=MetricSuite([ProbeEvaluator(forget, retain)]),
        callbacks=[stopper],
    )
    trainer.train()
    values = [h["eval_probe/forget_nll"] for h in trainer.state.log_history if "eval_probe/forget_nll" in h]
    print("forget NLL per eval:", [round(v, 3) for v in values])
    assert stopper.stopped_at == trainer.state.global_step == len(values) < 30
    assert abs(values[-1] - 1.5) <= 1.0 and all(abs(v - 1.5) > 1.0 for v in values[:-1])


def test_early_stopping_fails_clearly_on_a_metric_that_is_not_evaluated(tmp_path):
    with pytest.raises(KeyError, match="has no 'tofu/forget_truth_ratio'"):
        UnlearningEarlyStoppingCallback("tofu/forget_truth_ratio", 0.1, reference=EvaluationResult(summary={"x": 1.0}))
    stopper = UnlearningEarlyStoppingCallback("tofu/forget_truth_ratio", 0.1, target=0.6)
    with pytest.raises(KeyError, match="was not evaluated"):
        stopper.on_evaluate(None, None, None, metrics={"eval_loss": 1.0})
    with pytest.raises(ValueError, match="exactly one"):
        UnlearningEarlyStoppingCallback("m", 0.1)


def test_metric_suite_rejects_unknown_names_and_missing_data(tiny_llama, tokenizer):
    with pytest.raises(ValueError, match="valid names: tofu, muse, mia, memorization"):
        MetricSuite(["tofu", "bleu"])
    with pytest.raises(ValueError, match=r"needs \['forget', 'holdout'\]"):
        MetricSuite(["mia"]).run(tiny_llama, tokenizer)
    assert torch.is_grad_enabled()
