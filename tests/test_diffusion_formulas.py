"""The diffusion objective and each concept-erasure strategy against a hand computation on small tensors."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the diffusion strategies need diffusers")

from diffusers import DDPMScheduler  # noqa: E402

from erasus_hf.diffusion import (  # noqa: E402
    ESD,
    UCE,
    ConceptAblation,
    DiffusionObjective,
    DiffusionSalUn,
    esd_target,
    saliency_masks,
    uce_edit,
)
from erasus_hf.diffusion.modeling import build_text_encoder, build_tokenizer  # noqa: E402
from erasus_hf.diffusion.objective import UNetReference  # noqa: E402
from erasus_hf.strategies import StrategyContext, get_strategy  # noqa: E402


class AffineUNet(nn.Module):
    """A stand-in UNet with hand-checkable outputs: out = a * sample + b * mean(prompt embeddings)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.config = SimpleNamespace(sample_size=2, in_channels=1, cross_attention_dim=32)

    def forward(self, sample, timestep, encoder_hidden_states):
        m = encoder_hidden_states.mean((1, 2))[:, None, None, None]
        return SimpleNamespace(sample=self.a * sample + self.b * m)


@pytest.fixture(scope="module")
def objective():
    tokenizer = build_tokenizer()
    return DiffusionObjective(build_text_encoder(tokenizer), tokenizer, DDPMScheduler(num_train_timesteps=1000))


def ids(objective, *prompts):
    return objective.collator.tokenize_prompts(list(prompts))


def mean_embedding(objective, prompt):
    return objective.embed([prompt]).mean().item()


def ctx(objective, model, reference=None, retain_loss="none", gamma=1.0, alpha=1.0):
    return StrategyContext(
        model=model,
        objective=objective,
        reference=reference,
        forget_weight=gamma,
        retain_weight=alpha,
        retain_loss=retain_loss,
    )


def test_targets_epsilon_and_v_prediction_by_hand():
    x0 = torch.tensor([[[[0.5, -1.0]]]])
    noise = torch.tensor([[[[0.2, 0.3]]]])
    t = torch.tensor([500])
    tokenizer = build_tokenizer()
    encoder = build_text_encoder(tokenizer)
    eps = DiffusionObjective(encoder, tokenizer, DDPMScheduler(prediction_type="epsilon"))
    v = DiffusionObjective(encoder, tokenizer, DDPMScheduler(prediction_type="v_prediction"))
    assert torch.equal(eps.target(x0, noise, t), noise)
    abar = v.scheduler.alphas_cumprod[500].item()
    hand = [math.sqrt(abar) * n - math.sqrt(1 - abar) * x for n, x in ((0.2, 0.5), (0.3, -1.0))]
    assert v.target(x0, noise, t).flatten().tolist() == pytest.approx(hand, abs=1e-6)
    noisy = [math.sqrt(abar) * x + math.sqrt(1 - abar) * n for n, x in ((0.2, 0.5), (0.3, -1.0))]
    assert v.noisy(x0, noise, t).flatten().tolist() == pytest.approx(noisy, abs=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionObjective(encoder, tokenizer, DDPMScheduler(prediction_type="sample"))


def test_denoising_loss_by_hand(objective):
    unet = AffineUNet(0.5, 2.0)
    x0 = torch.tensor([[[[0.5, -1.0], [0.0, 1.0]]]])
    batch = {"pixel_values": x0, "input_ids": ids(objective, "a handwritten digit three")}
    torch.manual_seed(0)
    losses, _ = objective.denoising_losses(unet, batch)
    torch.manual_seed(0)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (1,))
    abar = objective.scheduler.alphas_cumprod[t].item()
    m = mean_embedding(objective, "a handwritten digit three")
    x_t = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
    hand = ((0.5 * x_t + 2.0 * m - noise) ** 2).mean().item()
    assert losses.item() == pytest.approx(hand, rel=1e-5)
    assert objective.score(unet, batch).mean_nll.shape == (1,)


def test_esd_target_by_hand():
    eps_uncond, eps_cond = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])
    assert esd_target(eps_uncond, eps_cond, 1.0).tolist() == [-1.0, 4.0]  # 1 - (3 - 1), 2 - (0 - 2)
    assert esd_target(eps_uncond, eps_cond, 0.5).tolist() == [0.0, 3.0]


def test_esd_loss_by_hand(objective):
    """One sampling step, so x_t is the starting noise at the first timestep; policy and frozen model differ."""
    policy, frozen = AffineUNet(0.5, 2.0), AffineUNet(0.8, -1.0)
    reference = UNetReference(frozen, "copy", contextlib.nullcontext)
    strategy = ESD(variant="esd-x", negative_guidance=1.5, num_inference_steps=1)
    prompt = "a handwritten digit three"
    forget = {"input_ids": ids(objective, prompt, prompt)}
    torch.manual_seed(0)
    loss, _ = strategy.forget_loss(ctx(objective, policy, reference), forget)
    torch.manual_seed(0)
    torch.randint(0, 1, ())
    x = torch.randn(2, 1, 2, 2)
    m_c, m_0 = mean_embedding(objective, prompt), mean_embedding(objective, "")
    eps_cond, eps_uncond = 0.8 * x - 1.0 * m_c, 0.8 * x - 1.0 * m_0
    target = eps_uncond - 1.5 * (eps_cond - eps_uncond)
    hand = ((0.5 * x + 2.0 * m_c - target) ** 2).mean().item()
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    loss.backward()
    assert policy.a.grad is not None and frozen.a.grad is None  # the target is the frozen model's, no gradient


def test_concept_ablation_loss_and_stop_gradient_by_hand(objective):
    """x_t cancels in the stand-in, so L = (b m(c*) - b m(c))^2 and, with the anchor branch detached,
    dL/db = 2 (b m(c*) - b m(c)) m(c*)."""
    unet = AffineUNet(0.5, 2.0)
    target, anchor = "a handwritten digit three", "a handwritten digit eight"
    forget = {
        "input_ids": ids(objective, target),
        "anchor_input_ids": ids(objective, anchor),
        "pixel_values": torch.randn(1, 1, 2, 2),
    }
    loss, _ = ConceptAblation().forget_loss(ctx(objective, unet), forget)
    m_t, m_a = mean_embedding(objective, target), mean_embedding(objective, anchor)
    assert loss.item() == pytest.approx((2.0 * m_t - 2.0 * m_a) ** 2, rel=1e-5)
    loss.backward()
    assert unet.b.grad.item() == pytest.approx(2 * (2.0 * m_t - 2.0 * m_a) * m_t, rel=1e-5)
    assert unet.a.grad.item() == pytest.approx(0.0, abs=1e-6)


def test_salun_mask_by_hand():
    grads = {"a": torch.tensor([0.1, -3.0]), "b": torch.tensor([[2.0, -0.5]])}
    masks = saliency_masks(grads, 0.5)  # top 2 of |g| = {3, 2}
    assert masks["a"].tolist() == [0.0, 1.0]
    assert masks["b"].tolist() == [[1.0, 0.0]]
    assert saliency_masks(grads, 1.0)["a"].tolist() == [1.0, 1.0]


def test_salun_loss_by_hand(objective):
    """Forget term (b m(c_f) - b m(c'))^2 with c' the retain partner's prompt; plus alpha x retain_weight x the
    retain denoising loss."""
    unet = AffineUNet(0.5, 2.0)
    strategy = DiffusionSalUn(alpha=0.5)
    strategy.masks = {"b": torch.ones(())}  # built by setup() in a run; not needed for the loss
    forget_prompt, pseudo = "a handwritten digit three", "a handwritten digit seven"
    forget = {"input_ids": ids(objective, forget_prompt), "pixel_values": torch.randn(1, 1, 2, 2)}
    retain = {"input_ids": ids(objective, pseudo), "pixel_values": torch.randn(1, 1, 2, 2)}
    loss, metrics = strategy.compute_loss(ctx(objective, unet, retain_loss="none"), forget, retain)
    m_f, m_p = mean_embedding(objective, forget_prompt), mean_embedding(objective, pseudo)
    assert loss.item() == pytest.approx((2.0 * m_f - 2.0 * m_p) ** 2, rel=1e-5)
    loss, metrics = strategy.compute_loss(ctx(objective, unet, retain_loss="nll", alpha=2.0), forget, retain)
    expected = metrics["forget_loss"].item() + 0.5 * 2.0 * metrics["retain_loss"].item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_uce_edit_by_hand():
    """W = diag(1, 2), erase c = e1 towards guide g = e2 (v* = W g = (0, 2)), lambda = 0.5:
    W_new = [[0.5, 0], [2, 1]] [[1.5, 0], [0, 0.5]]^-1 = [[1/3, 0], [4/3, 2]]; preserving p = e2 as well gives
    [[0.5, 0], [2, 3]] (2/3) I = [[1/3, 0], [4/3, 2]] and W_new p = W p exactly."""
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c, g, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    hand = [[1 / 3, 0.0], [4 / 3, 2.0]]
    assert uce_edit(w, c, g, None, lamb=0.5).tolist() == [pytest.approx(r, abs=1e-6) for r in hand]
    edited = uce_edit(w, c, g, p, lamb=0.5)
    assert edited.tolist() == [pytest.approx(r, abs=1e-6) for r in hand]
    assert (edited @ p[0]).tolist() == pytest.approx((w @ p[0]).tolist(), abs=1e-6)
    half = uce_edit(w.half(), c, g, p)
    assert half.dtype == torch.float16  # solved in float32, returned in the weight's dtype


def test_unknown_esd_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="esd-x, esd-u, esd-x-strict, esd-all"):
        get_strategy("esd", variant="esd-q")


def test_strategy_inputs_fail_clearly(objective):
    unet = AffineUNet(0.5, 2.0)
    no_images = {"input_ids": ids(objective, "a handwritten digit three")}
    with pytest.raises(ValueError, match="anchor_prompt"):
        ConceptAblation().forget_loss(ctx(objective, unet), no_images)
    with pytest.raises(ValueError, match="pixel_values"):
        DiffusionSalUn().compute_loss(ctx(objective, unet), no_images, None)
    with pytest.raises(ValueError, match="parameter_group"):
        ConceptAblation(parameter_group="attn9")
    with pytest.raises(ValueError, match="token_window"):
        UCE(token_window="first")
