"""Each strategy's loss against a hand computation on small tensors."""

import math

import pytest
import torch

from erasus_hf.reference import CachedReference
from erasus_hf.strategies import get_strategy, kl_to_reference

from .testing_utils import (
    LABELS,
    LOGITS,
    LogitsObjective,
    LogitsReference,
    batch,
    config,
    ctx,
    hand_token_logprobs,
    log_softmax_list,
    qa,
    small_llama,
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


KL_REF_LOGITS = torch.tensor(
    [
        [[9.0, 9.0, 9.0], [0.3, -0.2, 1.0], [0.0, 2.0, 0.0]],
        [[1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [9.0, -9.0, 9.0]],
    ]
)


def hand_kl(ref_row, policy_row):
    q, p = log_softmax_list(ref_row.tolist()), log_softmax_list(policy_row.tolist())
    return sum(math.exp(qv) * (qv - pv) for qv, pv in zip(q, p, strict=True))


def test_kl_retain_term_is_kl_ref_to_policy_on_answer_tokens():
    ref_logits = KL_REF_LOGITS
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


def test_kl_retain_term_over_all_positions_as_tofu():
    """retain_kl_positions="all": KL(ref || policy) summed over every position, the -100 ones included, divided by
    B x T = 6, which is TOFU's and open-unlearning's kl_div(policy, ref, reduction="batchmean", log_target=True) on
    logits flattened to [B x T, V]; the default averages over the 4 answer tokens, per example."""
    padding = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last position of example 1 is padding: it counts too
    retain = {"logits": LOGITS, "labels": LABELS, "attention_mask": padding}
    everywhere = [hand_kl(KL_REF_LOGITS[b, t], LOGITS[b, t]) for b in range(2) for t in range(3)]
    flat = [torch.log_softmax(x, -1).view(-1, 3) for x in (LOGITS, KL_REF_LOGITS)]
    tofu = torch.nn.functional.kl_div(flat[0], flat[1], reduction="batchmean", log_target=True)
    assert tofu.item() == pytest.approx(sum(everywhere) / 6, abs=1e-6)
    forget_nll = sum(-sum(r) / len(r) for r in hand_token_logprobs()) / 2
    answer_rows = [[everywhere[1], everywhere[2]], [everywhere[3], everywhere[4]]]  # LABELS' answer positions
    expected = {"all": sum(everywhere) / 6, "answer": sum(sum(r) / len(r) for r in answer_rows) / 2}
    for positions, kl in expected.items():
        context = ctx(reference=LogitsReference(KL_REF_LOGITS), retain_loss="kl")
        context.retain_kl_positions = positions
        loss, metrics = get_strategy("grad_diff").compute_loss(context, batch(), retain)
        assert metrics["retain_loss"].item() == pytest.approx(kl, abs=1e-6)
        assert loss.item() == pytest.approx(-forget_nll + kl, abs=1e-6)
    assert abs(expected["all"] - expected["answer"]) > 0.1
    context = ctx(reference=LogitsReference(KL_REF_LOGITS), retain_loss="kl")
    context.retain_kl_positions = "every"
    with pytest.raises(ValueError, match="Unknown retain_kl_positions 'every'"):
        get_strategy("grad_diff").compute_loss(context, batch(), retain)


def test_trainer_passes_retain_kl_positions_to_the_strategy(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """`UnlearningConfig.retain_kl_positions` reaches the retain term: the trainer's loss on one batch equals the
    hand computation from the two models' logits, for both settings; a bad value is refused with the fix."""
    from erasus_hf import UnlearningConfig, UnlearningTrainer

    forget, retain = (qa(d).select(range(4)) for d in tofu_slice)
    other = small_llama(tokenizer, seed=1)
    for positions in ("answer", "all"):
        args = config(tmp_path, strategy="grad_diff", retain_loss="kl", retain_kl_positions=positions)
        trainer = UnlearningTrainer(
            tiny_llama, args, forget_dataset=forget, retain_dataset=retain, ref_model=other, processing_class=tokenizer
        )
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, inputs).item()
            side = inputs["retain"]
            logits = [
                m(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits[:, :-1]
                for m in (tiny_llama, other)
            ]
            f = inputs["forget"]
            f_logits = tiny_llama(input_ids=f["input_ids"], attention_mask=f["attention_mask"]).logits[:, :-1]
        log_p, log_q = (torch.log_softmax(x.double(), -1) for x in logits)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # [B, T - 1]
        if positions == "all":
            expected_kl = kl.mean()
        else:
            answer = side["labels"][:, 1:] != -100
            expected_kl = ((kl * answer).sum(-1) / answer.sum(-1)).mean()
        f_labels = f["labels"][:, 1:]
        f_answer = f_labels != -100
        f_lp = torch.log_softmax(f_logits.double(), -1).gather(-1, f_labels.clamp_min(0)[..., None])[..., 0]
        forget_nll = (-(f_lp * f_answer).sum(-1) / f_answer.sum(-1)).mean()
        assert loss == pytest.approx((-forget_nll + expected_kl).item(), abs=1e-5), positions
    with pytest.raises(ValueError, match="retain_kl_positions must be one of"):
        UnlearningConfig(output_dir=str(tmp_path), retain_kl_positions="every")


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


def test_simnpo_margin_inside_beta_is_the_authors_code_form():
    """`margin_form="inside_beta"`: -(2/beta) log sigmoid(beta (-(1/|y|) log pi - gamma)), as the authors' code and
    open-unlearning write it; equal to the paper's form with gamma_margin = beta * gamma."""
    beta, gamma = 2.5, 0.3
    inside = get_strategy("simnpo", beta=beta, gamma_margin=gamma, margin_form="inside_beta")
    loss_inside = inside.compute_loss(ctx(), batch(), None)[0]
    per = []
    for row in hand_token_logprobs():
        x = beta * (-sum(row) / len(row) - gamma)
        per.append(-(2 / beta) * math.log(1 / (1 + math.exp(-x))))
    assert loss_inside.item() == pytest.approx(sum(per) / 2, abs=1e-6)
    outside = get_strategy("simnpo", beta=beta, gamma_margin=beta * gamma)
    assert outside.compute_loss(ctx(), batch(), None)[0].item() == pytest.approx(loss_inside.item(), abs=1e-6)
    same_number = get_strategy("simnpo", beta=beta, gamma_margin=gamma).compute_loss(ctx(), batch(), None)[0]
    assert abs(same_number.item() - loss_inside.item()) > 1e-2  # the forms differ when gamma is not converted
    with pytest.raises(ValueError, match="margin_form must be one of"):
        get_strategy("simnpo", margin_form="inside")


def test_published_defaults():
    assert get_strategy("npo").beta == 0.1
    simnpo = get_strategy("simnpo")
    assert (simnpo.beta, simnpo.gamma_margin, simnpo.margin_form) == (2.5, 0.0, "outside_beta")


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid strategies: .*grad_diff, .*npo, .*simnpo"):
        get_strategy("gradient_descent")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid: \['beta'\]"):
        get_strategy("npo", betta=0.2)
