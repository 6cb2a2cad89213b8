"""WGA, SatImp, UNDIAL and CE-U: each loss against a hand computation on small tensors, the detached weights'
gradients, the published defaults, and behaviour on the small Llama that memorised real TOFU authors."""

import math
import time

import pytest
import torch

from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.token_weighted import CEU, UNDIAL, WGA, SatImp

from .testing_utils import (
    LABELS,
    LOGITS,
    LogitsObjective,
    LogitsReference,
    batch,
    ctx,
    log_softmax_list,
    nll,
    unlearn,
)

# Answer positions of LABELS (row-major): (0, 1), (0, 2) for example 0; (1, 0), (1, 1) for example 1.
POSITIONS = [[(0, 1), (0, 2)], [(1, 0), (1, 1)]]

REF_LOGITS = torch.tensor(
    [
        [[9.0, -9.0, 9.0], [0.3, -0.2, 1.0], [0.0, 2.0, 0.0]],
        [[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [-9.0, 9.0, 9.0]],
    ]
)


def hand_softmax(row):
    return [math.exp(v) for v in log_softmax_list(row)]


def hand_token(b, t):
    """(p, l) of the true token at (b, t): its probability and NLL under LOGITS."""
    lp = log_softmax_list(LOGITS[b, t].tolist())[int(LABELS[b, t])]
    return math.exp(lp), -lp


def hand_mean_nll():
    return sum(sum(hand_token(b, t)[1] for b, t in row) / len(row) for row in POSITIONS) / 2


def hand_weighted_ga(weight):
    """-mean over examples of mean over answer tokens of weight(p) * l."""
    per_example = []
    for row in POSITIONS:
        terms = [weight(p) * nll for p, nll in (hand_token(b, t) for b, t in row)]
        per_example.append(sum(terms) / len(terms))
    return -sum(per_example) / 2


def hand_cross_entropy(target_logits, logits):
    """-sum_v softmax(target_logits)_v log softmax(logits)_v, for plain lists."""
    q = hand_softmax(target_logits)
    log_p = log_softmax_list(logits)
    return -sum(qv * lv for qv, lv in zip(q, log_p) if qv > 0)


# ---- WGA ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_wga_formula(beta):
    loss, metrics = get_strategy("wga", beta=beta).compute_loss(ctx(), batch(), None)
    assert loss.item() == pytest.approx(hand_weighted_ga(lambda p: p**beta), abs=1e-6)
    assert metrics["forget_nll"].item() == pytest.approx(hand_mean_nll(), abs=1e-6)
    weights = [hand_token(b, t)[0] ** beta for row in POSITIONS for b, t in row]
    assert metrics["wga_weight"].item() == pytest.approx(sum(weights) / 4, abs=1e-6)


def test_wga_beta_zero_is_gradient_ascent():
    wga, _ = get_strategy("wga", beta=0.0).compute_loss(ctx(), batch(), None)
    ga, _ = get_strategy("ga").compute_loss(ctx(), batch(), None)
    assert wga.item() == pytest.approx(ga.item(), abs=1e-6)


def hand_weighted_ga_grad(weight):
    """d/dz of -mean_b mean_t w(p_t) l_t with w held constant: dl_t/dz_v = softmax(z)_v - [v == y_t]."""
    grad = torch.zeros_like(LOGITS)
    for row in POSITIONS:
        for b, t in row:
            p, _ = hand_token(b, t)
            probs = hand_softmax(LOGITS[b, t].tolist())
            for v in range(3):
                dl = probs[v] - (1.0 if v == int(LABELS[b, t]) else 0.0)
                grad[b, t, v] = -weight(p) * dl / len(row) / 2
    return grad


@pytest.mark.parametrize(
    ("name", "kwargs", "weight"),
    [
        ("wga", {"beta": 2.0}, lambda p: p**2.0),
        ("satimp", {"beta1": 5.0, "beta2": 1.0}, lambda p: p**5.0 * (1 - p)),
    ],
)
def test_weights_are_detached(name, kwargs, weight):
    b = batch()
    loss, _ = get_strategy(name, **kwargs).compute_loss(ctx(), b, None)
    loss.backward()
    # With the weight differentiated too the gradient would carry an extra w'(p) dp/dz l term; it must not.
    assert torch.allclose(b["logits"].grad, hand_weighted_ga_grad(weight), atol=1e-6)
    assert b["logits"].grad[0, 0].abs().sum() == 0 and b["logits"].grad[1, 2].abs().sum() == 0  # -100 positions


# ---- SatImp ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("beta1", "beta2"), [(5.0, 1.0), (1.0, 2.0)])
def test_satimp_formula(beta1, beta2):
    loss, metrics = get_strategy("satimp", beta1=beta1, beta2=beta2).compute_loss(ctx(), batch(), None)
    assert loss.item() == pytest.approx(hand_weighted_ga(lambda p: p**beta1 * (1 - p) ** beta2), abs=1e-7)
    assert metrics["forget_nll"].item() == pytest.approx(hand_mean_nll(), abs=1e-6)


# ---- UNDIAL ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [10.0, 1.5])
def test_undial_formula(beta):
    strategy = get_strategy("undial", beta=beta)
    loss, metrics = strategy.compute_loss(ctx(reference=LogitsReference(REF_LOGITS)), batch(), None)
    per_example, target_probs = [], []
    for row in POSITIONS:
        terms = []
        for b, t in row:
            label = int(LABELS[b, t])
            adjusted = [z - (beta if v == label else 0.0) for v, z in enumerate(REF_LOGITS[b, t].tolist())]
            terms.append(hand_cross_entropy(adjusted, LOGITS[b, t].tolist()))
            target_probs.append(hand_softmax(adjusted)[label])
        per_example.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(sum(per_example) / 2, abs=1e-5)
    assert metrics["undial_target_prob"].item() == pytest.approx(sum(target_probs) / 4, abs=1e-6)


def test_undial_ignores_minus_100_positions_and_never_indexes_with_them():
    # Reference logits at the -100 positions are poison (nan); they must not reach the loss. Label -100 used as an
    # index would wrap around to the last vocabulary entry.
    ref = REF_LOGITS.clone()
    ref[0, 0] = float("nan")
    ref[1, 2] = float("nan")
    b = batch()
    loss, _ = get_strategy("undial").compute_loss(ctx(reference=LogitsReference(ref)), b, None)
    assert torch.isfinite(loss)
    loss.backward()
    assert b["logits"].grad[0, 0].abs().sum() == 0 and b["logits"].grad[1, 2].abs().sum() == 0


def test_undial_at_beta_zero_distils_the_reference():
    # beta = 0: the target is the reference itself; the loss is minimal (the reference entropy) when policy == ref.
    same = batch()
    same["logits"] = REF_LOGITS.clone().requires_grad_()
    loss, _ = get_strategy("undial", beta=0.0).compute_loss(ctx(reference=LogitsReference(REF_LOGITS)), same, None)
    loss.backward()
    assert same["logits"].grad.abs().max() < 1e-6


def test_undial_needs_reference_logits():
    assert UNDIAL.needs_reference == frozenset({"scores"})
    with pytest.raises(ValueError, match="needs a reference"):
        get_strategy("undial").compute_loss(ctx(), batch(), None)


# ---- CE-U --------------------------------------------------------------------------------------------------------


def hand_ceu(skip_first):
    per_example = []
    for row in POSITIONS:
        terms = []
        for b, t in row[1:] if skip_first else row:
            label = int(LABELS[b, t])
            logits = LOGITS[b, t].tolist()
            target = [-math.inf if v == label else z for v, z in enumerate(logits)]
            terms.append(hand_cross_entropy(target, logits))
        per_example.append(sum(terms) / len(terms))
    return sum(per_example) / 2


@pytest.mark.parametrize("skip_first", [False, True])
def test_ceu_formula(skip_first):
    loss, metrics = get_strategy("ce_u", ignore_first_token=skip_first).compute_loss(ctx(), batch(), None)
    assert loss.item() == pytest.approx(hand_ceu(skip_first), abs=1e-6)
    assert metrics["forget_nll"].item() == pytest.approx(hand_mean_nll(), abs=1e-6)


def test_ceu_gradient_is_p_minus_detached_target():
    # The target is built from detached logits: dL/dz = (softmax(z) - q) / (tokens of the example) / B.
    b = batch()
    get_strategy("ce_u", ignore_first_token=False).compute_loss(ctx(), b, None)[0].backward()
    expected = torch.zeros_like(LOGITS)
    for row in POSITIONS:
        for bi, t in row:
            label = int(LABELS[bi, t])
            probs = hand_softmax(LOGITS[bi, t].tolist())
            q = [0.0 if v == label else probs[v] / (1 - probs[label]) for v in range(3)]
            for v in range(3):
                expected[bi, t, v] = (probs[v] - q[v]) / len(row) / 2
    assert torch.allclose(b["logits"].grad, expected, atol=1e-6)


def test_ceu_ignore_first_token_drops_single_token_answers_from_the_mean():
    # Example 0 keeps one answer token; example 1 gets a one-token answer, which contributes 0 (still counted in the
    # mean over examples, so accumulation stays exact).
    labels = torch.tensor([[-100, 1, 2], [2, -100, -100]])
    loss, _ = get_strategy("ce_u").compute_loss(ctx(), {"logits": LOGITS, "labels": labels}, None)
    logits = LOGITS[0, 2].tolist()
    assert loss.item() == pytest.approx(hand_cross_entropy([logits[0], logits[1], -math.inf], logits) / 2, abs=1e-6)


# ---- contract ----------------------------------------------------------------------------------------------------


def test_published_defaults_and_contract():
    assert get_strategy("wga").beta == 1.0
    satimp = get_strategy("satimp")
    assert (satimp.beta1, satimp.beta2) == (5.0, 1.0)
    assert get_strategy("undial").beta == 10.0
    assert get_strategy("ce_u").ignore_first_token is True  # open-unlearning's CE-U: ignore_first_n_answer_tokens 1
    for cls in (WGA, SatImp, UNDIAL, CEU):
        assert cls.uses_retain is True
        assert cls.paper.startswith("https://arxiv.org/abs/")
    for cls in (WGA, SatImp, CEU):
        assert cls.needs_reference == frozenset()
    assert SatImp.hyperparameter_names() == ["beta1", "beta2"]


def test_retain_term_is_added():
    retain = {"logits": LOGITS.flip(0), "labels": LABELS}
    loss, metrics = get_strategy("ce_u").compute_loss(ctx(retain_loss="nll", alpha=2.0), batch(), retain)
    forget, _ = get_strategy("ce_u").compute_loss(ctx(), batch(), None)
    assert loss.item() == pytest.approx(forget.item() + 2.0 * metrics["retain_loss"].item(), abs=1e-6)


def test_misaligned_labels_fail_loudly():
    class Shifted(LogitsObjective):
        def score(self, model, batch, hidden_layer=None):
            scores = super().score(model, batch)
            scores.mask = scores.mask.roll(1, dims=-1)
            return scores

    context = ctx()
    context.objective = Shifted()
    with pytest.raises(ValueError, match="Cannot align labels"):
        get_strategy("ce_u").compute_loss(context, batch(), None)


# ---- behaviour ---------------------------------------------------------------------------------------------------


# The starting model's answer NLL is ~0.01 nats/token on both sets; bounds are rises in nats/token. LoRA, batch 8,
# constant lr, NLL retain term, alpha = 1. (strategy, learning rate, epochs, gamma, min forget rise, max retain rise)
# Measured here, forget rise / retain rise (repeat runs on CPU differ a little): wga 10.3-10.8 / 0.07-0.09,
# satimp 7.70 / 0.073, undial 2.39-2.65 / 0.09-0.10, ce_u 8.64 / 0.19. Each run takes 4-9 s on 2 idle cores.
# SatImp with gamma = 1 barely moves in this budget (+0.45 to +0.94 after 10 epochs at lr 5e-3, retain +0.005): the
# memorised tokens have p ~ 0.99, so its weight p^5 (1 - p) is ~0.01 and the retain gradient dominates Adam's step;
# the weight grows only as p falls, so the run sits on a knee. gamma = 10 gets it past the knee reproducibly.
# UNDIAL's loss is bounded (its target q is fixed), so its forget NLL rises least, as the paper intends.
CASES = [
    ("wga", 2e-3, 5, 1.0, 5.0, 0.5),
    ("satimp", 3e-3, 5, 10.0, 3.0, 0.5),
    ("undial", 2e-3, 5, 1.0, 1.5, 0.5),
    ("ce_u", 2e-3, 5, 1.0, 4.0, 0.6),
]


@pytest.mark.parametrize(("strategy", "lr", "epochs", "gamma", "min_forget_rise", "max_retain_rise"), CASES)
def test_unlearning_raises_forget_nll_and_holds_retain(
    tmp_path, memorised, tokenizer, tofu_slice, strategy, lr, epochs, gamma, min_forget_rise, max_retain_rise
):
    forget, retain = tofu_slice
    forget_before, retain_before = nll(memorised, tokenizer, forget), nll(memorised, tokenizer, retain)
    start = time.perf_counter()
    trainer = unlearn(memorised, tokenizer, tofu_slice, tmp_path, strategy, lr=lr, epochs=epochs, forget_weight=gamma)
    forget_rise = nll(trainer.model, tokenizer, forget) - forget_before
    retain_rise = nll(trainer.model, tokenizer, retain) - retain_before
    print(f"{strategy}: forget +{forget_rise:.3f}, retain +{retain_rise:.3f} ({time.perf_counter() - start:.1f}s)")
    assert forget_rise > min_forget_rise
    assert retain_rise < max_retain_rise
