"""EnsembleStrategy (weighted sum, shared forward passes) and StrategyPipeline (reference stays the original)."""

import copy
import json

import pytest
import torch

from erasus_hf import StrategyPipeline, UnlearningTrainer
from erasus_hf.data.collator import QACollator
from erasus_hf.objectives import CausalLMObjective
from erasus_hf.reference import CachedReference
from erasus_hf.strategies import EnsembleStrategy, get_strategy

from .testing_utils import LogitsObjective, batch, config, ctx, qa


class CountingObjective(LogitsObjective):
    def __init__(self):
        self.calls = 0

    def score(self, model, batch, hidden_layer=None):
        self.calls += 1
        return super().score(model, batch, hidden_layer)


def test_ensemble_is_the_weighted_sum_and_shares_forward_passes():
    ref = CachedReference(torch.tensor([-3.0, -1.5]))
    members = [("ga", 1.0), ("simnpo", 0.5, {"beta": 3.0}), ("npo", 2.0)]
    expected = sum(
        w * get_strategy(name, **(kw[0] if kw else {})).compute_loss(ctx(reference=ref), batch(), None)[0].item()
        for name, w, *kw in members
    )
    context = ctx(reference=ref)
    counting = CountingObjective()
    context.objective = counting
    loss, metrics = EnsembleStrategy(members).compute_loss(context, batch(), None)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert counting.calls == 1  # three strategies, one forward pass on the forget batch
    assert {"ga/loss", "simnpo/loss", "npo/loss", "npo/npo_log_ratio"} <= set(metrics)


def test_ensemble_needs_what_its_members_need():
    ensemble = get_strategy("ensemble", members=[["ga", 1.0], ["npo", 1.0]])
    assert ensemble.reference_quantities("nll") == {"sequence_logprob"}
    assert ensemble.needs_retain("nll") and not get_strategy("ga").needs_retain("nll")
    with pytest.raises(ValueError, match="valid strategies"):
        get_strategy("ensemble", members=[["nope", 1.0]])
    with pytest.raises(ValueError, match="at least one"):
        get_strategy("ensemble")


@pytest.mark.parametrize("member", ["ssd", "salun", "bad_teacher", "l1_sparse", "task_vector"])
def test_ensemble_refuses_one_shot_and_stateful_members(member):
    with pytest.raises(ValueError, match=f"'{member}'.*StrategyPipeline"):
        EnsembleStrategy([("grad_diff", 1.0), (member, 1.0)])


def test_ensemble_trains_through_the_trainer_by_name(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(
        tmp_path, strategy="ensemble", max_steps=2, strategy_kwargs={"members": [["npo", 1.0], ["simnpo", 0.5]]}
    )
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    assert trainer.reference_mode == "cached"
    trainer.train()
    logged = trainer.state.log_history[1]
    assert logged["loss"] == pytest.approx(logged["npo/loss"] + 0.5 * logged["simnpo/loss"], rel=1e-4)


def _forget_logprob(model, tokenizer, forget):
    batch = QACollator(tokenizer)(forget.select(range(8)).to_list())
    with torch.no_grad():
        return CausalLMObjective().score(model, batch).sequence_logprob, batch


@pytest.mark.parametrize("lora", [False, True])
def test_pipeline_keeps_the_original_model_as_reference(tmp_path, tokenizer, tiny_llama, tofu_slice, lora):
    forget, retain = (qa(d) for d in tofu_slice)
    original, batch = _forget_logprob(copy.deepcopy(tiny_llama), tokenizer, forget)
    args = config(
        tmp_path, use_peft=lora, learning_rate=1e-2, reference="copy" if not lora else "auto", retain_loss="kl"
    )
    pipeline = StrategyPipeline([("ga", {"max_steps": 3}), ("grad_diff", {"max_steps": 2})])
    trainers = pipeline.run(tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
    assert len(trainers) == 2 and trainers[1].model is trainers[0].model
    after_stage_1 = trainers[0].state.log_history  # stage 1 really moved the model
    assert after_stage_1[-2]["forget_nll"] > after_stage_1[0]["forget_nll"]
    reference = trainers[1].reference.scores(trainers[1].model_objective, batch).sequence_logprob
    assert torch.allclose(reference, original, atol=1e-4)
    current, _ = _forget_logprob(trainers[1].model, tokenizer, forget)
    assert not torch.allclose(current, original, atol=1e-2)
    if lora:
        assert list(trainers[1].model.peft_config) == ["default"]  # no snapshot of a half-unlearned adapter


@pytest.mark.parametrize("lora", [False, True])
def test_pipeline_by_name_from_the_config(tmp_path, tokenizer, tiny_llama, tofu_slice, lora):
    """`strategy="pipeline"`: the stages run inside one trainer's `train()`, share its reference to the original
    model, and the trainer saves the final model."""
    forget, retain = (qa(d) for d in tofu_slice)
    original, batch = _forget_logprob(copy.deepcopy(tiny_llama), tokenizer, forget)
    stages = [["ga", {"max_steps": 3}], ["npo", {"max_steps": 2, "strategy_kwargs": {"beta": 0.2}}]]
    args = config(
        tmp_path,
        strategy="pipeline",
        strategy_kwargs=json.dumps({"stages": stages}),
        use_peft=lora,
        learning_rate=1e-2,
        retain_loss="kl",
    )
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    assert trainer.reference_mode == ("adapter" if lora else "copy")
    output = trainer.train()
    assert output.metrics["stage_0_ga/train_loss"] < 0 < output.metrics["stage_1_npo/train_loss"]
    assert trainer.state.global_step == 5
    reference = trainer.reference.scores(trainer.model_objective, batch).sequence_logprob
    assert torch.allclose(reference, original, atol=1e-4)
    current, _ = _forget_logprob(trainer.model, tokenizer, forget)
    assert (current < original - 1.0).all()
    trainer.save_model()
    assert json.loads((tmp_path / "out" / "strategy.json").read_text())["stages"] == stages
