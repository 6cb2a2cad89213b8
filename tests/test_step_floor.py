"""The unlearning step's speed work changes no number: the causal-LM scores without the copy of the shifted logits,
the float32 log-softmax of the KL terms, the metrics kept on the device and gathered when read, the cached
reference placed on the device once. Each is checked against the code it replaced, written out here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from erasus_hf import UnlearningTrainer
from erasus_hf.data.collator import QACollator
from erasus_hf.divergence import DivergenceCallback, TrainingDivergedError
from erasus_hf.objectives import Scores, get_objective
from erasus_hf.reference import CachedReference
from erasus_hf.strategies.base import kl_over_all_positions, kl_to_reference

from .testing_utils import config, qa


def _old_causal_lm_scores(model, batch) -> Scores:
    """`CausalLMObjective.score` before: the cross-entropy over the sliced logits `[:, :-1]`, copied to flatten."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return Scores(token_logprobs=-nll.view(labels.shape), mask=labels != -100, logits=logits)


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_scores_and_gradients_equal_the_sliced_logits_ones(tokenizer, tiny_llama, tofu_slice, padding_side):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = padding_side
    collator = QACollator(tokenizer, max_length=64)
    rows = qa(tofu_slice[0]).select(range(6))
    batch = collator([collator.tokenize(row) for row in rows])
    objective = get_objective("causal_lm", tiny_llama)

    new = objective.score(tiny_llama, batch)
    new_loss = new.sequence_logprob.mean() + new.mean_nll.mean() + new.logits.square().mean()
    new_loss.backward()
    new_grads = _grads(tiny_llama)
    old = _old_causal_lm_scores(tiny_llama, batch)
    old_loss = old.sequence_logprob.mean() + old.mean_nll.mean() + old.logits.square().mean()
    old_loss.backward()
    old_grads = _grads(tiny_llama)

    assert new.token_logprobs.shape == old.token_logprobs.shape and torch.equal(new.mask, old.mask)
    torch.testing.assert_close(new.token_logprobs, old.token_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(new.logits, old.logits, rtol=0, atol=0)
    torch.testing.assert_close(new_loss, old_loss, rtol=0, atol=1e-6)
    assert new_grads.keys() == old_grads.keys() and new_grads
    for name, grad in new_grads.items():
        torch.testing.assert_close(grad, old_grads[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_terms_equal_the_float32_copy_ones(dtype, temperature):
    generator = torch.Generator().manual_seed(0)
    policy_logits = (3 * torch.randn(2, 5, 11, generator=generator)).to(dtype).requires_grad_()
    reference_logits = (3 * torch.randn(2, 5, 11, generator=generator)).to(dtype)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    zeros = torch.zeros(mask.shape)

    def scores(logits):
        return Scores(token_logprobs=zeros, mask=mask, logits=logits)

    new = kl_to_reference(scores(policy_logits), scores(reference_logits), temperature)
    (new_grad,) = torch.autograd.grad(new.sum(), policy_logits)
    # before: log_softmax(logits.float() / temperature) of the answer positions
    log_p = torch.log_softmax(policy_logits[mask].float() / temperature, dim=-1)
    log_q = torch.log_softmax(reference_logits[mask].float() / temperature, dim=-1)
    per_token = torch.zeros(mask.shape)
    per_token[mask] = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2
    old = per_token.sum(-1) / mask.sum(-1)
    (old_grad,) = torch.autograd.grad(old.sum(), policy_logits)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_grad, old_grad, rtol=0, atol=1e-6)

    everywhere = kl_over_all_positions(scores(policy_logits), scores(reference_logits))
    log_p = torch.log_softmax(policy_logits.float(), dim=-1).flatten(0, -2)
    log_q = torch.log_softmax(reference_logits.float(), dim=-1).flatten(0, -2)
    torch.testing.assert_close(everywhere, (log_q.exp() * (log_q - log_p)).sum() / log_p.shape[0], rtol=0, atol=1e-6)


class _GatherEveryStep(UnlearningTrainer):
    """The trainer as it was: every stored step's metrics gathered across processes at once."""

    def _store_metrics(self, metrics, mode):
        if not metrics:
            return
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        values = self.accelerator.gather(values[None]).mean(0)
        for key, value in zip(keys, values.tolist(), strict=True):
            self._metrics[mode][key].append(value)


@pytest.mark.parametrize("divergence_factor", [None, 100.0])
def test_logged_and_evaluated_metrics_equal_a_gather_per_step(
    tmp_path, tokenizer, tiny_llama, tofu_slice, divergence_factor
):
    forget, retain = (qa(d) for d in tofu_slice)
    runs = {}
    for cls in (UnlearningTrainer, _GatherEveryStep):
        args = config(
            tmp_path / cls.__name__,
            strategy="npo",
            retain_loss="kl",
            max_steps=5,
            logging_steps=2,
            divergence_factor=divergence_factor,
        )
        model = copy.deepcopy(tiny_llama)
        trainer = cls(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)
        trainer.train()
        history = [
            {k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
            for h in trainer.state.log_history
        ]
        evaluated = {k: v for k, v in trainer.evaluate().items() if "runtime" not in k and "per_second" not in k}
        runs[cls] = (history, evaluated)
        assert not any(trainer._pending_metrics.values()) if cls is UnlearningTrainer else True
    (history, evaluated), (old_history, old_evaluated) = runs.values()
    assert [h for h in history if "npo_log_ratio" in h], history  # the windows' metrics are in the logs
    assert history == old_history
    assert evaluated == old_evaluated and "eval_forget_nll" in evaluated


def test_divergence_stops_at_the_step_a_gather_per_step_stopped_at(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """GradDiff at learning rate 1 runs away (tests/test_reliability_outputs.py): both trainers stop at one step."""
    forget, retain = (qa(d) for d in tofu_slice)
    steps = []
    for cls in (UnlearningTrainer, _GatherEveryStep):
        args = config(
            tmp_path / cls.__name__,
            strategy="grad_diff",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_steps=10,
        )
        trainer = cls(
            copy.deepcopy(tiny_llama), args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
        (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, DivergenceCallback)]
        with pytest.raises(TrainingDivergedError, match=r"at step (\d+): retain_loss") as caught:
            trainer.train()
        steps.append((caught.value.args[0], callback.start, trainer._metrics["train"]["retain_loss"]))
        assert not trainer._pending_metrics["train"]  # gathered at each step's check
    assert steps[0] == steps[1] and 2 <= trainer.state.global_step < 10


def test_cached_reference_is_placed_once_and_follows_a_replaced_table():
    reference = CachedReference(torch.tensor([-3.0, -1.5]))
    batch = {"index": torch.tensor([1, 0])}
    assert reference.sequence_logprob(None, batch).tolist() == [-1.5, -3.0]
    placed = reference._on(torch.device("cpu"))
    assert reference._on(torch.device("cpu")) is placed  # not copied again at the next step
    reference.logprobs = torch.tensor([[-2.0], [-4.0]])  # a resumed run's table
    assert reference.sequence_logprob(None, batch).tolist() == [-4.0, -2.0]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_stacked_forward_gives_the_two_separate_forwards_loss_and_gradients(
    tokenizer, tiny_llama, tofu_slice, padding_side
):
    """benchmarks/perf.py's stacked-forward probe times a pass that must compute what the trainer's two passes do."""
    from benchmarks.perf import stacked_scores

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = padding_side
    collator = QACollator(tokenizer, max_length=256)
    forget_rows, retain_rows = (qa(d).select(range(5)) for d in tofu_slice)
    forget = collator([collator.tokenize(row) for row in forget_rows])
    retain = collator([collator.tokenize({**row, "answer": row["answer"] * 2}) for row in retain_rows])  # wider
    assert forget["input_ids"].shape[1] != retain["input_ids"].shape[1]
    objective = get_objective("causal_lm", tiny_llama)

    def loss(f: Scores, r: Scores) -> torch.Tensor:
        return f.sequence_logprob.mean() + r.mean_nll.mean()

    separate = objective.score(tiny_llama, forget), objective.score(tiny_llama, retain)
    separate_loss = loss(*separate)
    separate_loss.backward()
    separate_grads = _grads(tiny_llama)
    stacked = stacked_scores(objective, tiny_llama, forget, retain, left=padding_side == "left")
    stacked_loss = loss(*stacked)
    stacked_loss.backward()
    stacked_grads = _grads(tiny_llama)

    for one, other in zip(stacked, separate, strict=True):
        assert torch.equal(one.mask, other.mask)
        torch.testing.assert_close(one.token_logprobs, other.token_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(stacked_loss, separate_loss, rtol=0, atol=1e-6)
    for name, grad in separate_grads.items():
        torch.testing.assert_close(stacked_grads[name], grad, rtol=0, atol=1e-6, msg=name)
