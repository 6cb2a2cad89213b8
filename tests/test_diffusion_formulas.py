"""The diffusion objective and each concept-erasure strategy against a hand computation on small tensors."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the diffusion strategies need diffusers")

from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from erasus_hf import UnlearningConfig, UnlearningTrainer  # noqa: E402
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
from erasus_hf.diffusion.uce import concept_token_embeddings, last_token_positions  # noqa: E402
from erasus_hf.strategies import get_strategy  # noqa: E402

from .testing_utils import context  # noqa: E402


class AffineUNet(nn.Module):
    """A stand-in UNet with hand-checkable outputs: out = a * sample + b * m(prompt), m the mean over the tokens of
    the embeddings' first feature (not the mean over all features: CLIP's final LayerNorm makes that ~0 for every
    prompt, which would hide a wrong prompt)."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.config = SimpleNamespace(sample_size=2, in_channels=1, cross_attention_dim=32)

    def forward(self, sample, timestep, encoder_hidden_states):
        m = encoder_hidden_states[..., 0].mean(1)[:, None, None, None]
        return SimpleNamespace(sample=self.a * sample + self.b * m)


class TimedAffineUNet(AffineUNet):
    """AffineUNet plus tau * t / 1000, so a prediction at the wrong timestep shows."""

    def __init__(self, a: float, b: float, tau: float) -> None:
        super().__init__(a, b)
        self.tau = tau

    def forward(self, sample, timestep, encoder_hidden_states):
        out = super().forward(sample, timestep, encoder_hidden_states).sample
        return SimpleNamespace(sample=out + self.tau * timestep.float()[:, None, None, None] / 1000)


class PixelAffineUNet(AffineUNet):
    """AffineUNet with one (a, b) per pixel of a 1x2x2 sample: eight weights, so a saliency mask can pick some."""

    def __init__(self, a: list[float], b: list[float]) -> None:
        super().__init__(0.0, 0.0)
        self.a = nn.Parameter(torch.tensor(a).view(1, 2, 2))
        self.b = nn.Parameter(torch.tensor(b).view(1, 2, 2))


def sd_clip_tokenizer(words: list[str], max_length: int = 10) -> CLIPTokenizer:
    """A real `CLIPTokenizer` with its defaults: padded with its EOS (`<|endoftext|>`), as Stable Diffusion 1.x's
    is; its BPE merges spell each word as one token."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces:
            vocab.setdefault(piece, len(vocab))
        joined = pieces[0]
        for piece in pieces[1:]:
            if (joined, piece) not in merges:
                merges.append((joined, piece))
            joined += piece
            vocab.setdefault(joined, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


@pytest.fixture(scope="module")
def objective():
    tokenizer = build_tokenizer()
    return DiffusionObjective(build_text_encoder(tokenizer), tokenizer, DDPMScheduler(num_train_timesteps=1000))


def ids(objective, *prompts):
    return objective.collator.tokenize_prompts(list(prompts))


def mean_embedding(objective, prompt):
    """m(prompt) of `AffineUNet`."""
    return objective.embed([prompt])[0, :, 0].mean().item()


def ctx(objective, model, reference=None, retain_loss="none", gamma=1.0, alpha=1.0):
    return context(objective, model, reference, gamma, alpha, retain_loss)


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


def test_esd_loss_samples_partway_by_hand():
    """5 DDIM steps on Stable Diffusion's schedule (scaled_linear betas, steps_offset 1: t = 801, 601, 401, 201, 1);
    the drawn stop k = 2 runs two concept-guided (w = 3) DDIM steps from the noise, then the frozen model's target
    and the policy's prediction are taken at (x_401, 401). The sampling loop is written out here."""
    tokenizer = build_tokenizer()
    sampler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False,
        set_alpha_to_one=False,
    )  # fmt: skip
    objective = DiffusionObjective(
        build_text_encoder(tokenizer), tokenizer, DDPMScheduler(num_train_timesteps=1000), sampling_scheduler=sampler
    )
    policy, frozen = TimedAffineUNet(0.5, 2.0, tau=-0.7), TimedAffineUNet(0.8, -1.0, tau=0.4)
    reference = UNetReference(frozen, "copy", contextlib.nullcontext)
    strategy = ESD(variant="esd-x", negative_guidance=1.5, start_guidance=3.0, num_inference_steps=5)
    prompt = "a handwritten digit three"
    forget = {"input_ids": ids(objective, prompt, prompt)}
    torch.manual_seed(10)
    loss, metrics = strategy.forget_loss(ctx(objective, policy, reference), forget)

    torch.manual_seed(10)
    k = int(torch.randint(0, 5, ()))
    assert k == 2  # a stop in the middle of the schedule
    x = torch.randn(2, 1, 2, 2).double()  # init_noise_sigma = 1 for DDIM
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    timesteps = [801, 601, 401, 201, 1]
    m_c, m_0 = mean_embedding(objective, prompt), mean_embedding(objective, "")

    def frozen_eps(x, t, m):
        return 0.8 * x - 1.0 * m + 0.4 * t / 1000

    for t in timesteps[:k]:
        eps = frozen_eps(x, t, m_0) + 3.0 * (frozen_eps(x, t, m_c) - frozen_eps(x, t, m_0))
        a_t, a_prev = abar[t], abar[t - 200] if t >= 200 else abar[0]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    t = timesteps[k]
    eps_cond, eps_uncond = frozen_eps(x, t, m_c), frozen_eps(x, t, m_0)
    target = eps_uncond - 1.5 * (eps_cond - eps_uncond)
    hand = ((0.5 * x + 2.0 * m_c - 0.7 * t / 1000 - target) ** 2).mean().item()
    assert loss.item() == pytest.approx(hand, rel=1e-5)
    assert metrics["esd_timestep"].item() == t
    loss.backward()
    assert policy.a.grad is not None and frozen.a.grad is None  # the target is the frozen model's, no gradient


def test_concept_ablation_loss_and_stop_gradient_by_hand(objective):
    """x_t cancels in the stand-in's value, so L = (b m(c*) - b m(c))^2; with the anchor branch detached only the
    target branch carries gradient: dL/db = 2 (b m(c*) - b m(c)) m(c*), dL/da = 2 (b m(c*) - b m(c)) mean(x_t)
    (without the stop-gradient dL/da would be 0)."""
    unet = AffineUNet(0.5, 2.0)
    target, anchor = "a handwritten digit three", "a handwritten digit eight"
    forget = {
        "input_ids": ids(objective, target),
        "anchor_input_ids": ids(objective, anchor),
        "pixel_values": torch.randn(1, 1, 2, 2),
    }
    torch.manual_seed(0)
    loss, _ = ConceptAblation().forget_loss(ctx(objective, unet), forget)
    torch.manual_seed(0)
    noise = torch.randn_like(forget["pixel_values"])
    abar = objective.scheduler.alphas_cumprod[torch.randint(0, 1000, (1,))].item()
    x_t = math.sqrt(abar) * forget["pixel_values"] + math.sqrt(1 - abar) * noise
    m_t, m_a = mean_embedding(objective, target), mean_embedding(objective, anchor)
    assert loss.item() == pytest.approx((2.0 * m_t - 2.0 * m_a) ** 2, rel=1e-5)
    loss.backward()
    assert unet.b.grad.item() == pytest.approx(2 * (2.0 * m_t - 2.0 * m_a) * m_t, rel=1e-5)
    assert unet.a.grad.item() == pytest.approx(2 * (2.0 * m_t - 2.0 * m_a) * x_t.mean().item(), rel=1e-5)


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


def test_salun_saliency_is_the_guided_forget_loss_gradient_by_hand(objective, monkeypatch, tmp_path):
    """With out = a x + b m(c) per pixel, the guided prediction (1 + w) out(c) - w out("") is a x + b mu, mu =
    (1 + w) m(c) - w m(""); for ell = -mean((pred - eps)^2) over a batch of B 1x2x2 images, dell/da = -2/(4B) sum_i
    (pred_i - eps_i) x_i and dell/db = -2/(4B) sum_i (pred_i - eps_i) mu_i. The saliency sums them over the forget
    batches; the mask keeps the top half of |g| (4 of the 8 weights)."""
    unet = PixelAffineUNet([0.5, -0.2, 0.3, 1.0], [2.0, -1.0, 0.7, 0.1])
    prompts = ["a handwritten digit three", "a handwritten digit three", "a handwritten digit seven", "a digit"]
    generator = torch.Generator().manual_seed(0)
    rows = [{"prompt": q, "pixel_values": torch.rand(1, 2, 2, generator=generator) * 2 - 1} for q in prompts]
    args = UnlearningConfig(
        output_dir=str(tmp_path), strategy="diffusion_salun", report_to="none", retain_loss="none",
        per_device_train_batch_size=2, strategy_kwargs={"mask_guidance": 7.5, "pseudo_prompts": ["a digit"]},
    )  # fmt: skip
    trainer = UnlearningTrainer(unet, args, forget_dataset=rows, objective=objective)
    drawn = []  # what the forget batches were noised with: (x_0, eps, t) per batch
    noisy = objective.noisy

    def recording(latents, noise, timesteps):
        drawn.append((latents, noise, timesteps))
        return noisy(latents, noise, timesteps)

    monkeypatch.setattr(objective, "noisy", recording)
    ours = trainer.strategy.saliency_gradients(trainer)
    assert len(drawn) == 2  # two batches of two

    w = 7.5
    m = {q: mean_embedding(objective, q) for q in prompts}
    mu = torch.tensor([(1 + w) * m[q] - w * mean_embedding(objective, "") for q in prompts]).view(4, 1, 1, 1)
    grad_a, grad_b = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
    for batch, (x0, eps, t) in enumerate(drawn):
        abar = objective.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        mu_b = mu[2 * batch : 2 * batch + 2]
        residual = unet.a.detach() * x_t + unet.b.detach() * mu_b - eps
        grad_a += (-2 / 8 * residual * x_t).sum(0)
        grad_b += (-2 / 8 * residual * mu_b).sum(0)
    assert torch.allclose(ours["a"], grad_a, rtol=1e-4, atol=1e-6)
    assert torch.allclose(ours["b"], grad_b, rtol=1e-4, atol=1e-6)

    flat = torch.cat([grad_a.flatten(), grad_b.flatten()]).abs()
    top = torch.zeros(8)
    top[flat.topk(4).indices] = 1
    masks = saliency_masks(ours, 0.5)
    assert torch.equal(torch.cat([masks["a"].flatten(), masks["b"].flatten()]), top)


def test_uce_edit_by_hand():
    """W = [[1, 2], [3, 4]] (not symmetric, so W and W^T give different edits), erase c = e1 towards guide g = e2
    (v* = W g = (2, 4)), lambda = 0.5: W_new = [[2.5, 1], [5.5, 2]] [[1.5, 0], [0, 0.5]]^-1 = [[5/3, 2], [11/3, 4]];
    preserving p = e2 as well gives [[2.5, 3], [5.5, 6]] (2/3) I, the same, and W_new p = W p exactly. A 3x2 W
    (out 3, in 2) edits row by row: its third row [5, 6] -> [(2.5 + 6) 2/3, 6]."""
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    c, g, p = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    hand = [[5 / 3, 2.0], [11 / 3, 4.0]]
    assert uce_edit(w, c, g, None, lamb=0.5).tolist() == [pytest.approx(r, abs=1e-6) for r in hand]
    edited = uce_edit(w, c, g, p, lamb=0.5)
    assert edited.tolist() == [pytest.approx(r, abs=1e-6) for r in hand]
    assert (edited @ p[0]).tolist() == pytest.approx((w @ p[0]).tolist(), abs=1e-6)
    tall = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert uce_edit(tall, c, g, None, lamb=0.5).tolist() == [pytest.approx(r, abs=1e-6) for r in [*hand, [17 / 3, 6]]]
    half = uce_edit(w.half(), c, g, p)
    assert half.dtype == torch.float16  # solved in float32, returned in the weight's dtype


def test_uce_takes_the_last_word_token_when_the_tokenizer_pads_with_eos():
    """Stable Diffusion 1.x's CLIP tokenizer pads with EOS: the edited token is still the concept's last word (the
    position before EOS: 4 in "<bos> a handwritten digit three <eos>", 1 in "<bos> cat <eos>"), never BOS or EOS,
    so two one-word concepts get different embeddings (BOS's is the same for every prompt)."""
    tokenizer = sd_clip_tokenizer(["a", "handwritten", "digit", "three", "cat", "dog"])
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    objective = DiffusionObjective(build_text_encoder(tokenizer), tokenizer, DDPMScheduler())
    prompts = ["a handwritten digit three", "cat", "dog"]
    token_ids, positions = last_token_positions(objective, prompts)
    assert positions.tolist() == [4, 1, 1]
    picked = [tokenizer.convert_ids_to_tokens(int(row[i])) for row, i in zip(token_ids, positions, strict=True)]
    assert picked == ["three</w>", "cat</w>", "dog</w>"]
    full = objective.embed(prompts)
    last = concept_token_embeddings(objective, prompts, "last", "cpu")
    for row, (embedding, i) in enumerate(zip(last, [4, 1, 1], strict=True)):
        assert embedding.shape == (1, 32) and torch.equal(embedding[0], full[row, i])
    assert not torch.allclose(last[1], last[2])  # "cat" and "dog" are different concepts
    windows = concept_token_embeddings(objective, prompts, "last_to_end", "cpu")
    assert [len(w) for w in windows] == [10 - 4, 10 - 1, 10 - 1]  # from the last word to the padded end
    assert torch.equal(windows[0][0], full[0, 4])
    assert last_token_positions(objective, [""])[1].tolist() == [0]  # the empty guide: its BOS, as the authors'


def test_uce_erases_one_word_and_keeps_another_with_an_eos_padded_tokenizer(tmp_path):
    """Erase "cat" (towards "") and preserve "dog" under a CLIP tokenizer padded with EOS: the edited key/value of
    the word token (position 1) lands on the guide's (the empty prompt's BOS, position 0) and "dog"'s stays, within 1%
    of the cat-guide gap (measured: 0.07%). (Editing BOS for both, as counting non-pad ids did, cannot do both.)"""
    from erasus_hf.diffusion.modeling import build_unet

    tokenizer = sd_clip_tokenizer(["cat", "dog"], max_length=6)
    objective = DiffusionObjective(build_text_encoder(tokenizer), tokenizer, DDPMScheduler())
    unet = build_unet(32, size=8)
    old = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    args = UnlearningConfig(
        output_dir=str(tmp_path), strategy="uce", report_to="none", retain_loss="nll",
        strategy_kwargs={"erase_scale": 100.0, "preserve_scale": 100.0},  # larger: float32 inverse error shows
    )  # fmt: skip
    trainer = UnlearningTrainer(
        unet, args, forget_dataset=[{"prompt": "cat"}], retain_dataset=[{"prompt": "dog"}], objective=objective
    )
    trainer.train()
    cat, dog, guide = objective.embed(["cat"])[0, 1], objective.embed(["dog"])[0, 1], objective.embed([""])[0, 0]
    modules = dict(unet.named_modules())
    for name, w_old in old.items():
        w_new = modules[name].weight.detach()
        gap = (w_old @ cat - w_old @ guide).norm()
        assert (w_new @ cat - w_old @ guide).norm() < 0.01 * gap, name
        assert (w_new @ dog - w_old @ dog).norm() < 0.01 * gap, name


def test_uce_without_an_eos_fails_clearly():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<unk>": 1, "<eos>": 2, "cat": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", model_max_length=4
    )  # no BOS / EOS added around the prompt
    objective = DiffusionObjective(build_text_encoder(tokenizer), tokenizer, DDPMScheduler())
    with pytest.raises(ValueError, match="BOS, tokens, EOS"):
        last_token_positions(objective, ["cat cat"])


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
