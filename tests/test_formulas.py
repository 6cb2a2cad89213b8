"""Each strategy's loss against a hand computation on small tensors."""

import math

import pytest
import torch

from erasus_hf.objectives import Objective, Scores, token_logprobs_from_logits
from erasus_hf.reference import CachedReference, Reference
from erasus_hf.strategies import StrategyContext, get_strategy, kl_to_reference


class LogitsObjective(Objective):
    """A stand-in model family whose 'model output' is the batch's own logits: exact, hand-checkable scores."""

    name = "causal_lm"

    def score(self, model, batch, hidden_layer=None):
        logprobs, mask = token_logprobs_from_logits(batch["logits"], batch["labels"])
        return Scores(token_logprobs=logprobs, mask=mask, logits=batch["logits"])


class LogitsReference(Reference):
    mode = "copy"

    def __init__(self, logits):
        self.logits = logits

    def scores(self, objective, batch, hidden_layer=None):
        return objective.score(None, {**batch, "logits": self.logits})


def log_softmax_list(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


# Two examples, three positions, vocabulary of 3; -100 marks prompt/padding.
LOGITS = torch.tensor(
    [
        [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.5, -0.5, 0.3]],
        [[0.2, 0.1, 3.0], [-1.0, 2.0, 0.5], [0.0, 0.0, 0.0]],
    ]
)
LABELS = torch.tensor([[-100, 1, 2], [2, 0, -100]])


def hand_token_logprobs():
    out = []
    for b in range(2):
        row = []
        for t in range(3):
            label = int(LABELS[b, t])
            if label != -100:
                row.append(log_softmax_list(LOGITS[b, t].tolist())[label])
        out.append(row)
    return out  # [[lp(1), lp(2)], [lp(2), lp(0)]]


def batch():
    return {"logits": LOGITS.clone().requires_grad_(), "labels": LABELS, "index": torch.tensor([0, 1])}


def ctx(reference=None, retain_loss="none", gamma=1.0, alpha=1.0):
    return StrategyContext(
        model=None,
        objective=LogitsObjective(),
        reference=reference,
        forget_weight=gamma,
        retain_weight=alpha,
        retain_loss=retain_loss,
    )


def test_scores_mask_minus_100_and_sum_answer_tokens():
    scores = LogitsObjective().score(None, batch())
    hand = hand_token_logprobs()
    assert scores.mask.tolist() == [[False, True, True], [True, True, False]]
    assert scores.sequence_logprob.tolist() == pytest.approx([sum(r) for r in hand], abs=1e-6)
    assert scores.mean_nll.tolist() == pytest.approx([-sum(r) / len(r) for r in hand], abs=1e-6)


def test_ga_is_minus_mean_example_nll():
    loss, metrics = get_strategy("ga").compute_loss(ctx(), batch(), None)
    hand = hand_token_logprobs()
    nll = sum(-sum(r) / len(r) for r in hand) / 2
    assert loss.item() == pytest.approx(-nll, abs=1e-6)
    assert metrics["forget_nll"].item() == pytest.approx(nll, abs=1e-6)


def test_grad_diff_nll_retain_term():
    retain = {"logits": LOGITS.flip(0), "labels": LABELS}
    loss, metrics = get_strategy("grad_diff").compute_loss(
        ctx(retain_loss="nll", gamma=0.5, alpha=2.0), batch(), retain
    )
    hand_f = hand_token_logprobs()
    forget_nll = sum(-sum(r) / len(r) for r in hand_f) / 2
    retain_rows = []
    for b, src in enumerate([1, 0]):
        lps = log_softmax_list
        row = [lps(LOGITS[src, t].tolist())[int(LABELS[b, t])] for t in range(3) if LABELS[b, t] != -100]
        retain_rows.append(-sum(row) / len(row))
    retain_nll = sum(retain_rows) / 2
    assert loss.item() == pytest.approx(-0.5 * forget_nll + 2.0 * retain_nll, abs=1e-6)
    assert metrics["retain_loss"].item() == pytest.approx(retain_nll, abs=1e-6)


def test_kl_retain_term_is_kl_ref_to_policy_on_answer_tokens():
    ref_logits = torch.tensor(
        [
            [[9.0, 9.0, 9.0], [0.3, -0.2, 1.0], [0.0, 2.0, 0.0]],
            [[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [9.0, -9.0, 9.0]],
        ]
    )
    policy = LogitsObjective().score(None, batch())
    reference = LogitsObjective().score(None, {"logits": ref_logits, "labels": LABELS})
    per_example = kl_to_reference(policy, reference)
    hand = []
    for b in range(2):
        kls = []
        for t in range(3):
            if LABELS[b, t] == -100:
                continue  # position 0 of example 0 and position 2 of example 1 must not count
            q = log_softmax_list(ref_logits[b, t].tolist())
            p = log_softmax_list(LOGITS[b, t].tolist())
            kls.append(sum(math.exp(qv) * (qv - pv) for qv, pv in zip(q, p)))
        hand.append(sum(kls) / len(kls))
    assert per_example.tolist() == pytest.approx(hand, abs=1e-6)
    retain = {"logits": LOGITS, "labels": LABELS}
    loss, _ = get_strategy("grad_diff").compute_loss(
        ctx(reference=LogitsReference(ref_logits), retain_loss="kl"), batch(), retain
    )
    forget_nll = sum(-sum(r) / len(r) for r in hand_token_logprobs()) / 2
    assert loss.item() == pytest.approx(-forget_nll + sum(hand) / 2, abs=1e-6)


def test_npo_formula_with_reference_logprobs():
    beta = 0.1
    ref = torch.tensor([-3.0, -1.5])
    loss, metrics = get_strategy("npo", beta=beta).compute_loss(ctx(reference=CachedReference(ref)), batch(), None)
    hand = hand_token_logprobs()
    ratios = [sum(hand[0]) - (-3.0), sum(hand[1]) - (-1.5)]
    per = [-(2 / beta) * math.log(1 / (1 + math.exp(beta * r))) for r in ratios]  # log sigmoid(-beta r)
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-5)
    assert metrics["npo_log_ratio"].item() == pytest.approx(sum(ratios) / 2, abs=1e-6)


def test_npo_gradient_tends_to_ga_as_beta_vanishes():
    ref = CachedReference(torch.tensor([-3.0, -1.5]))
    b_npo, b_ga = batch(), batch()
    get_strategy("npo", beta=1e-4).compute_loss(ctx(reference=ref), b_npo, None)[0].backward()
    # dL/dr = 2 sigmoid(beta r) -> 1: the gradient of the mean sequence log-likelihood (GA on summed log-probs).
    scores = LogitsObjective().score(None, b_ga)
    (scores.sequence_logprob.mean()).backward()
    assert torch.allclose(b_npo["logits"].grad, b_ga["logits"].grad, atol=1e-4)


def test_simnpo_formula_length_normalised():
    beta, margin = 2.5, 0.7
    loss, _ = get_strategy("simnpo", beta=beta, gamma_margin=margin).compute_loss(ctx(), batch(), None)
    hand = hand_token_logprobs()
    per = []
    for row in hand:
        x = -(beta / len(row)) * sum(row) - margin
        per.append(-(2 / beta) * math.log(1 / (1 + math.exp(-x))))
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-6)


def test_published_defaults():
    assert get_strategy("npo").beta == 0.1
    simnpo = get_strategy("simnpo")
    assert (simnpo.beta, simnpo.gamma_margin) == (2.5, 0.0)


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid strategies: .*grad_diff, .*npo, .*simnpo"):
        get_strategy("gradient_descent")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['beta'\]"):
        get_strategy("npo", betta=0.2)
