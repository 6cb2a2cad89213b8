"""SCRUB: the temperature-scaled KL, the alternation of max- and min-steps, and behaviour on real TOFU."""

import math

import pytest
import torch

from erasus_hf import UnlearningTrainer
from erasus_hf.strategies import get_strategy

from .testing_utils import LABELS, LOGITS, LogitsReference, batch, config, ctx, log_softmax_list, nll, qa, unlearn

REF_LOGITS = torch.tensor(
    [
        [[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.3, 0.3, 3.0]],
        [[1.0, 2.0, 0.0], [0.0, 0.5, 0.5], [5.0, 5.0, 5.0]],
    ]
)


def hand_distill_kl(student, teacher, labels, temperature):
    out = []
    for b in range(student.shape[0]):
        kls = []
        for t in range(student.shape[1]):
            if labels[b, t] == -100:
                continue
            s = log_softmax_list((student[b, t] / temperature).tolist())
            q = log_softmax_list((teacher[b, t] / temperature).tolist())
            kls.append(sum(math.exp(qv) * (qv - sv) for qv, sv in zip(q, s, strict=True)) * temperature**2)
        out.append(sum(kls) / len(kls))
    return sum(out) / len(out)


def test_scrub_alternates_max_and_min_steps():
    scrub = get_strategy("scrub")
    # the authors' large-scale notebook: kd_T = 4, alpha = 0.001, gamma = 0.99, msteps = 2 (of sgda_epochs = 3)
    assert (scrub.temperature, scrub.alpha, scrub.gamma, scrub.max_epochs) == (4.0, 0.001, 0.99, 2)
    reference = LogitsReference(REF_LOGITS)
    retain = {"logits": LOGITS.flip(0), "labels": LABELS}

    context = ctx(reference=reference)
    context.global_step, context.epoch = 0, 0.5  # even step in the first epoch: max-step on forget
    loss, metrics = scrub.compute_loss(context, batch(), retain)
    assert loss.item() == pytest.approx(-hand_distill_kl(LOGITS, REF_LOGITS, LABELS, 4.0), abs=1e-5)
    assert metrics["scrub_max_step"] == 1

    context = ctx(reference=reference)
    context.global_step, context.epoch = 4, 1.5  # even step in the second epoch: still a max-step
    assert scrub.compute_loss(context, batch(), retain)[1]["scrub_max_step"] == 1

    for step, epoch in [(1, 0.5), (6, 2.0)]:  # odd step, or past the max epochs: min-step on retain
        context = ctx(reference=reference)
        context.global_step, context.epoch = step, epoch
        loss, metrics = scrub.compute_loss(context, batch(), retain)
        student = LOGITS.flip(0)
        nll = []
        for b in range(2):
            row = [
                log_softmax_list(student[b, t].tolist())[int(LABELS[b, t])] for t in range(3) if LABELS[b, t] != -100
            ]
            nll.append(-sum(row) / len(row))
        kl = hand_distill_kl(student, REF_LOGITS, LABELS, 4.0)
        assert loss.item() == pytest.approx(0.99 * sum(nll) / 2 + 0.001 * kl, abs=1e-5)
        assert metrics["scrub_max_step"] == 0


def test_scrub_needs_a_reference_and_retain(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(ValueError, match="needs a retain_dataset"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="scrub"),
            forget_dataset=qa(tofu_slice[0]),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="cannot give"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="scrub", reference="cached"),
            forget_dataset=qa(tofu_slice[0]),
            retain_dataset=qa(tofu_slice[1]),
            processing_class=tokenizer,
        )


def test_scrub_forgets_on_real_tofu(tmp_path, memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    before = nll(memorised, tokenizer, forget), nll(memorised, tokenizer, retain)
    trainer = unlearn(memorised, tokenizer, tofu_slice, tmp_path, "scrub", {"max_epochs": 4}, lr=5e-3, epochs=6)
    assert trainer.reference_mode == "adapter"
    after = nll(trainer.model, tokenizer, forget), nll(trainer.model, tokenizer, retain)
    print(f"scrub: forget {before[0]:.3f}->{after[0]:.3f}, retain {before[1]:.3f}->{after[1]:.3f}")
    # Measured here: forget 0.011 -> 1.44, retain 0.012 -> 0.07 (10 max-steps of 30).
    assert after[0] - before[0] > 1.0
    assert after[1] - before[1] < 0.2
