"""RMU and PDU: the losses against hand computations, RMU's trained parameters and hidden layer, PDU's dual ascent,
and both on the small Llama that memorised TOFU authors."""

import math

import pytest
import torch
from torch import nn

from erasus_hf.data.collator import QACollator
from erasus_hf.objectives import CausalLMObjective, Objective, Scores, token_logprobs_from_logits
from erasus_hf.reference import Reference
from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.rmu import LayerOutputObjective, answer_positions

from .testing_utils import LogitsObjective, context, log_softmax_list, nll, unlearn

# ---------------------------------------------------------------- stand-ins


class HiddenObjective(Objective):
    """A stand-in model family: the batch carries its logits and, per decoder layer, the layer's output; scoring runs
    the given outputs through the model's (identity) layers, so RMU's forward hook sees them."""

    name = "causal_lm"

    def score(self, model, batch, hidden_layer=None):
        for layer, hidden in zip(model.layers, batch["hidden"]):
            layer(hidden)
        logprobs, mask = token_logprobs_from_logits(batch["logits"], batch["labels"])
        return Scores(token_logprobs=logprobs, mask=mask, logits=batch["logits"])


class IdentityStack(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity() for _ in range(n)])


class HiddenReference(Reference):
    mode = "copy"

    def __init__(self, model, hidden):
        self.model, self.hidden = model, hidden

    def scores(self, objective, batch, hidden_layer=None):
        return objective.score(self.model, {**batch, "hidden": self.hidden})


# ---------------------------------------------------------------- RMU formulas


def test_rmu_published_defaults_and_steering_vector():
    rmu = get_strategy("rmu")
    assert rmu.hyperparameters == {
        "layer_id": 7,
        "steering_coeff": 6.5,
        "alpha": 1200.0,
        "param_layer_ids": None,
        "seed": 42,
    }
    assert rmu.trained_layer_ids == [5, 6, 7]
    assert get_strategy("rmu", layer_id=1).trained_layer_ids == [0, 1]  # l-2 clipped at 0
    u = rmu.steering_vector(64)
    assert u.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert (u >= 0).all()  # torch.rand: uniform on [0, 1) before normalising, as in the official code
    r = torch.rand(64, generator=torch.Generator().manual_seed(42))
    assert torch.equal(u, r / r.norm())
    assert torch.equal(get_strategy("rmu").steering_vector(64), u)  # reproducible from the seed
    assert not torch.allclose(get_strategy("rmu", seed=1).steering_vector(64), u)


def test_rmu_loss_against_hand_computation():
    c, alpha, gamma, retain_weight, layer = 2.0, 3.0, 0.5, 2.0, 1
    g = torch.Generator().manual_seed(0)
    B, T_in, H = 2, 4, 3
    # hidden[i] is the output of layer i; the loss must read layer `layer` only.
    forget_hidden = [torch.randn(B, T_in, H, generator=g) for _ in range(2)]
    retain_hidden = [torch.randn(B, T_in, H, generator=g) for _ in range(2)]
    ref_hidden = [torch.randn(B, T_in, H, generator=g) for _ in range(2)]
    logits = torch.randn(B, T_in - 1, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2], [-100, -100, 4]])  # shifted: labels[:, t] is the token at position t+1
    forget = {"hidden": forget_hidden, "logits": logits, "labels": labels}
    retain = {
        "hidden": retain_hidden,
        "logits": logits,
        "labels": labels,
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),  # one padded position
    }
    model = IdentityStack(2)
    rmu = get_strategy("rmu", layer_id=layer, steering_coeff=c, alpha=alpha)
    ctx = context(HiddenObjective(), model, HiddenReference(model, ref_hidden), gamma=gamma, alpha=retain_weight)
    loss, metrics = rmu.compute_loss(ctx, forget, retain)

    # The control vector by hand, as the official code builds it (wmdp `rmu/unlearn.py`: r = torch.rand(1, 1, H),
    # control_vec = r / ||r|| * steering_coeff), r drawn from a generator seeded with RMU's `seed` (default 42).
    r = torch.rand(H, generator=torch.Generator().manual_seed(42)).tolist()
    u = [v / math.sqrt(sum(x * x for x in r)) for v in r]
    control = [c * v for v in u]
    forget_rows, norms, cosines = [], [], []
    for b in range(B):
        per_position = []
        for t in range(T_in - 1):
            if labels[b, t] == -100:
                continue
            h = forget_hidden[layer][b, t + 1].tolist()  # the answer token sits at input position t+1
            per_position.append(sum((h[k] - control[k]) ** 2 for k in range(H)) / H)
            norm = math.sqrt(sum(v * v for v in h))
            norms.append(norm)
            cosines.append(sum(h[k] * u[k] for k in range(H)) / norm)
        forget_rows.append(sum(per_position) / len(per_position))
    forget_term = sum(forget_rows) / B
    retain_rows = []
    for b in range(B):
        per_position = []
        for t in range(T_in):
            if retain["attention_mask"][b, t] == 0:
                continue
            h, r = retain_hidden[layer][b, t].tolist(), ref_hidden[layer][b, t].tolist()
            per_position.append(sum((h[k] - r[k]) ** 2 for k in range(H)) / H)
        retain_rows.append(sum(per_position) / len(per_position))
    retain_term = sum(retain_rows) / B

    assert loss.item() == pytest.approx(gamma * forget_term + alpha * retain_weight * retain_term, abs=1e-5)
    assert metrics["forget_mse"].item() == pytest.approx(forget_term, abs=1e-6)
    assert metrics["retain_mse"].item() == pytest.approx(retain_term, abs=1e-6)
    assert metrics["forget_activation_norm"].item() == pytest.approx(sum(norms) / len(norms), abs=1e-5)
    assert metrics["forget_cos_u"].item() == pytest.approx(sum(cosines) / len(cosines), abs=1e-5)

    loss_none, metrics_none = rmu.compute_loss(
        context(HiddenObjective(), model, None, retain_loss="none"), forget, None
    )
    assert loss_none.item() == pytest.approx(forget_term, abs=1e-6) and "retain_mse" not in metrics_none
    assert rmu.reference_quantities("none") == frozenset()
    assert rmu.reference_quantities("nll") == frozenset({"scores"})


def test_rmu_reads_the_decoder_layer_output(tiny_llama, tokenizer):
    """Layer l's output is hidden_states[l + 1] except for the last layer, where transformers puts the final-normed
    state in hidden_states[-1]; the hook reads the layer itself, as the official code does."""
    batch = QACollator(tokenizer)([{"question": "Who wrote it?", "answer": " Jane Doe."}])
    with torch.no_grad():
        hs = tiny_llama(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        layer0 = LayerOutputObjective(CausalLMObjective(), 0).score(tiny_llama, batch)
        layer1 = LayerOutputObjective(CausalLMObjective(), 1).score(tiny_llama, batch).hidden_states
    assert torch.allclose(layer0.hidden_states, hs[1], atol=1e-6)
    assert not torch.allclose(layer1, hs[2], atol=1e-3)
    assert torch.allclose(tiny_llama.model.norm(layer1), hs[2], atol=1e-5)
    positions = answer_positions(layer0)
    assert positions[:, 1:].equal(layer0.mask) and not positions[:, 0].any()
    labels = batch["labels"][0]
    assert positions[0].tolist() == (labels != -100).tolist()  # the input positions that hold answer tokens


def test_rmu_prepare_model_trains_only_the_chosen_down_projections(tiny_llama):
    get_strategy("rmu", layer_id=1).prepare_model(tiny_llama)
    trainable = sorted(n for n, p in tiny_llama.named_parameters() if p.requires_grad)
    assert trainable == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    get_strategy("rmu", layer_id=1, param_layer_ids=[1]).prepare_model(tiny_llama)
    assert [n for n, p in tiny_llama.named_parameters() if p.requires_grad] == ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        get_strategy("rmu", layer_id=2).prepare_model(tiny_llama)
    with pytest.raises(ValueError, match="num_hidden_layers=2"):
        get_strategy("rmu", layer_id=1, param_layer_ids=[3]).prepare_model(tiny_llama)


def test_rmu_prepare_model_under_peft_trains_only_down_proj_lora(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules="all-linear"))
    get_strategy("rmu", layer_id=0).prepare_model(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight",
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight",
    ]
    no_down_proj = get_peft_model(type(tiny_llama)(tiny_llama.config), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="down_proj"):
        get_strategy("rmu", layer_id=0).prepare_model(no_down_proj)


# ---------------------------------------------------------------- PDU formulas


def retain_with_nll(value):
    """A one-token retain batch whose answer NLL is `value`: logits [0, x], label 0, NLL = log(1 + e^x)."""
    x = math.log(math.exp(value) - 1)
    return {"logits": torch.tensor([[[0.0, x]]]), "labels": torch.tensor([[0]])}


def test_pdu_needs_epsilon_and_keeps_published_defaults():
    with pytest.raises(ValueError, match="epsilon"):
        get_strategy("pdu")
    assert get_strategy("pdu", epsilon=0.3).hyperparameters == {
        "epsilon": 0.3,
        "eta": 5.0,
        "initial_lambda": 100.0,
        "warmup_steps": 0,
        "forget_objective": "logit_margin",
    }
    with pytest.raises(ValueError, match="forget_objective"):
        get_strategy("pdu", epsilon=0.3, forget_objective="entropy")
    assert get_strategy("pdu", epsilon=0.3).reference_quantities("nll") == frozenset()
    assert get_strategy("pdu", epsilon=0.3, forget_objective="npo").reference_quantities("nll") == {"sequence_logprob"}
    assert get_strategy("pdu", epsilon=0.3).reference_quantities("kl") == {"scores"}


def test_pdu_loss_against_hand_computation():
    logits = torch.tensor(
        [
            [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.5, -0.5, 0.3]],
            [[0.2, 0.1, 3.0], [-1.0, 2.0, 0.5], [0.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[-100, 1, 2], [2, 0, -100]])
    retain = {"logits": logits.flip(0), "labels": labels}
    pdu = get_strategy("pdu", epsilon=0.4, initial_lambda=3.0)
    forget = {"logits": logits, "labels": labels}
    loss, metrics = pdu.compute_loss(context(LogitsObjective(), gamma=0.5), forget, retain)
    forget_rows, retain_rows = [], []
    for b in range(2):
        margins = [
            (max(logits[b, t].tolist()) - sum(logits[b, t].tolist()) / 3) ** 2
            for t in range(3)
            if labels[b, t] != -100
        ]
        forget_rows.append(sum(margins) / len(margins))
        nlls = [
            -log_softmax_list(logits[1 - b, t].tolist())[int(labels[b, t])] for t in range(3) if labels[b, t] != -100
        ]
        retain_rows.append(sum(nlls) / len(nlls))
    forget_term, retain_term = sum(forget_rows) / 2, sum(retain_rows) / 2
    assert loss.item() == pytest.approx(0.5 * forget_term + 3.0 * (retain_term - 0.4), abs=1e-5)
    assert metrics["forget_loss"].item() == pytest.approx(forget_term, abs=1e-5)
    assert metrics["retain_loss"].item() == pytest.approx(retain_term, abs=1e-6)
    assert metrics["pdu_lambda"].item() == 3.0
    assert metrics["pdu_slack"].item() == pytest.approx(0.4 - retain_term, abs=1e-6)
    ga = get_strategy("pdu", epsilon=0.4, forget_objective="ga").forget_loss(context(LogitsObjective()), forget)[0]
    hand_nll = [
        -sum(log_softmax_list(logits[b, t].tolist())[int(labels[b, t])] for t in answer) / len(answer)
        for b, answer in enumerate([[1, 2], [0, 1]])
    ]
    assert ga.item() == pytest.approx(-sum(hand_nll) / 2, abs=1e-5)
    # Flat logits are the minimum: zero loss, whatever the label.
    flat = {"logits": torch.full((1, 2, 4), 0.7), "labels": torch.tensor([[1, 3]])}
    assert get_strategy("pdu", epsilon=1.0).forget_loss(context(LogitsObjective()), flat)[0].item() == 0.0


def test_pdu_dual_ascent_once_per_step_after_warmup_clamped_at_zero():
    eps, eta, lam0 = 0.5, 2.0, 1.0
    pdu = get_strategy("pdu", epsilon=eps, eta=eta, initial_lambda=lam0, warmup_steps=1)
    forget = {"logits": torch.tensor([[[1.0, 0.0]]]), "labels": torch.tensor([[0]])}
    forget_term = 0.5**2  # (max - mean)^2 of [1, 0]
    # (optimizer step, training?, retain NLL, lambda the call must use). Hand-computed dual updates:
    #   step 0 (two micro-batches): warm-up, no update          -> lambda 1.0 at step 1
    #   step 1: 0.9 - 0.5 = +0.4, lambda 1.0 + 2 * 0.4 = 1.8     (the eval call in between changes nothing)
    #   step 2: 0.1 - 0.5 = -0.4, lambda 1.8 - 0.8 = 1.0
    #   step 3: two micro-batches, mean 0.2 - 0.5 = -0.3, lambda 1.0 - 0.6 = 0.4 (once, not per micro-batch)
    #   step 4: -0.4, lambda max(0, 0.4 - 0.8) = 0 (clamped)
    #   step 5: -0.4, lambda stays 0
    calls = [
        (0, True, 1.0, 1.0),
        (0, True, 0.8, 1.0),
        (1, True, 0.9, 1.0),
        (1, False, 5.0, 1.0),
        (2, True, 0.1, 1.8),
        (2, False, 5.0, 1.8),
        (3, True, 0.2, 1.0),
        (3, True, 0.2, 1.0),
        (4, True, 0.1, 0.4),
        (5, True, 0.1, 0.0),
        (6, True, 0.1, 0.0),
    ]
    for step, training, retain_nll, expected_lambda in calls:
        ctx = context(LogitsObjective(), step=step, training=training)
        loss, metrics = pdu.compute_loss(ctx, forget, retain_with_nll(retain_nll))
        assert metrics["pdu_lambda"].item() == pytest.approx(expected_lambda, abs=1e-6), (step, training)
        assert loss.item() == pytest.approx(forget_term + expected_lambda * (retain_nll - eps), abs=1e-5)
    assert pdu.dual == 0.0
    # A new run (back to step 0) restarts lambda.
    _, metrics = pdu.compute_loss(context(LogitsObjective(), step=0), forget, retain_with_nll(0.1))
    assert metrics["pdu_lambda"].item() == lam0


# ---------------------------------------------------------------- behaviour on the memorised Llama


def rmu_activation_stats(model, tokenizer, dataset, rmu):
    """Mean (1/H)||h - c u||^2 and mean cos(h, u) over the forget answer tokens at RMU's layer."""
    rows = [{"question": q, "answer": a} for q, a in zip(dataset["question"], dataset["answer"])]
    batch = QACollator(tokenizer)(rows)
    with torch.no_grad():
        scores = LayerOutputObjective(CausalLMObjective(), rmu.layer_id).score(model.eval(), batch)
    h = scores.hidden_states[answer_positions(scores)]
    u = rmu.steering_vector(h.shape[-1])
    mse = ((h - rmu.steering_coeff * u) ** 2).mean(-1).mean().item()
    return mse, (h @ u / h.norm(dim=-1)).mean().item(), h.norm(dim=-1).mean().item()


# The memorised model's layer-1 output has mean norm 2.75 on the forget answer tokens (2.76 on retain; layer 0:
# 1.41), so c = 10 (~3.6x that norm; the published 6.5 is for Zephyr-7B's layer 7). Full fine-tune of the down_proj
# of layers 0 and 1, alpha = 10: the published 1200 (and 100) pins the activations here, where forget and retain are
# the same kind of text (alpha 100, c 20: forget NLL only +1.7). Measured with lr 1e-2, 4 epochs (20 steps, 8-50 s on
# 2 shared CPU cores): forget NLL 0.011 -> 4.48, retain 0.012 -> 0.26, (1/H)||h - c u||^2 0.83 -> 0.10,
# cos(h, u) 0.02 -> 0.96, |h| 2.75 -> 8.5.
@pytest.mark.slow
def test_rmu_unlearns_the_memorised_authors(tmp_path, memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    kwargs = {"layer_id": 1, "steering_coeff": 10.0, "alpha": 10.0}
    rmu = get_strategy("rmu", **kwargs)
    before = {n: p.detach().clone() for n, p in memorised.named_parameters()}
    forget_before, retain_before = nll(memorised, tokenizer, forget), nll(memorised, tokenizer, retain)
    mse_before, cos_before, norm_before = rmu_activation_stats(memorised, tokenizer, forget, rmu)
    trainer = unlearn(memorised, tokenizer, tofu_slice, tmp_path, "rmu", kwargs, 1e-2, 4, use_peft=False)
    assert trainer.reference_mode == "copy"
    model = trainer.model
    forget_after, retain_after = nll(model, tokenizer, forget), nll(model, tokenizer, retain)
    mse_after, cos_after, norm_after = rmu_activation_stats(model, tokenizer, forget, rmu)
    print(
        f"rmu: forget {forget_before:.3f}->{forget_after:.3f}, retain {retain_before:.3f}->{retain_after:.3f}, "
        f"mse {mse_before:.3f}->{mse_after:.3f}, cos(h,u) {cos_before:.3f}->{cos_after:.3f}, "
        f"|h| {norm_before:.2f}->{norm_after:.2f}"
    )
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert mse_after < 0.5 * mse_before and cos_after > cos_before + 0.5
    assert forget_after - forget_before > 3.0
    assert retain_after - retain_before < 0.6
    logs = [h for h in trainer.state.log_history if "forget_mse" in h]
    assert logs and {"retain_mse", "forget_activation_norm", "forget_cos_u"} <= set(logs[0])


# The published dual settings (lambda_0 = 100, eta = 5) with LoRA, lr 2e-3, 4 epochs (20 steps) and epsilon = 0.1
# (the starting retain NLL is 0.012). Measured: forget NLL 0.011 -> 10.0, retain 0.012 -> 0.121; lambda falls
# 100 -> 97.8 while the constraint holds, then rises to 112.5 once the retain NLL passes epsilon. (lambda_0 = 1
# lets the retain NLL overshoot first: lambda 1 -> 0 -> 188, forget +1.4, retain 0.17.)
@pytest.mark.slow
def test_pdu_unlearns_under_the_retain_constraint(tmp_path, memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    forget_before, retain_before = nll(memorised, tokenizer, forget), nll(memorised, tokenizer, retain)
    kwargs = {"epsilon": 0.1}
    trainer = unlearn(memorised, tokenizer, tofu_slice, tmp_path, "pdu", kwargs, 2e-3, 4, use_peft=True)
    assert trainer.reference_mode == "none"
    forget_after, retain_after = nll(trainer.model, tokenizer, forget), nll(trainer.model, tokenizer, retain)
    lambdas = [h["pdu_lambda"] for h in trainer.state.log_history if "pdu_lambda" in h]
    print(f"pdu: forget {forget_before:.3f}->{forget_after:.3f}, retain {retain_before:.3f}->{retain_after:.3f}")
    print("pdu lambda:", [round(v, 2) for v in lambdas])
    assert len(lambdas) == 20 and lambdas[0] == 100.0  # logged every step (logging_steps=1)
    low = min(range(20), key=lambdas.__getitem__)
    assert lambdas[low] < 100.0 and lambdas[-1] > lambdas[low] + 5  # down while satisfied, up once violated
    assert forget_after - forget_before > 5.0
    assert retain_after < 3 * 0.1  # near epsilon, not the collapse of an unconstrained forget term
