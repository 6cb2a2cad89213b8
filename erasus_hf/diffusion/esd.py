"""Erased Stable Diffusion (ESD): fine-tune the UNet towards negatively guided predictions of the frozen original."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..strategies.base import Batch, StrategyContext
from ..strategies.config import StrategyConfig
from ..strategies.registry import register_strategy
from .common import DiffusionStrategy, frozen_reference, mean_squared_error, objective_of, select_trainable

ESD_VARIANTS = {
    "esd-x": "cross_attention",
    "esd-u": "non_cross_attention",
    "esd-x-strict": "cross_attention_kv",
    "esd-all": "all",
}


def esd_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, negative_guidance: float) -> torch.Tensor:
    """eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)]: the frozen model's prediction guided away from c."""
    return eps_uncond - negative_guidance * (eps_cond - eps_uncond)


@dataclass
class ESDConfig(StrategyConfig):
    variant: str = field(
        default="esd-x",
        metadata={
            "help": "Which UNet parameters train: 'esd-x' cross-attention (styles; the default), 'esd-u' every "
            "linear/conv layer but cross-attention (objects, nudity), 'esd-x-strict' only attn2.to_k / attn2.to_v, "
            "'esd-all' every linear/conv layer."
        },
    )
    negative_guidance: float = field(
        default=1.0,
        metadata={"help": "eta, how far the target is guided away from the concept; the paper's value is 1."},
    )
    start_guidance: float = field(
        default=3.0,
        metadata={"help": "Classifier-free guidance when sampling x_t from the frozen model; the paper's value is 3."},
    )
    num_inference_steps: int = field(
        default=50,
        metadata={"help": "Sampling steps (>= 1) of the schedule x_t is drawn from; the paper's 50 DDIM steps."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ESD_VARIANTS:
            raise ValueError(f"Unknown ESD variant {self.variant!r}; valid variants: {', '.join(ESD_VARIANTS)}")
        if self.num_inference_steps < 1:
            raise ValueError(f"ESD needs num_inference_steps >= 1, got {self.num_inference_steps}")


@register_strategy
class ESD(DiffusionStrategy):
    """Erasing Concepts from Diffusion Models.

    Gandikota, Materzynska, Fiotto-Kaufman, Bau 2023, ICCV (arXiv:2303.07345).

    L_ESD = E || eps_theta(x_t, c, t) - (eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)]) ||^2, with eps* the
    frozen original model, c the concept prompt (the forget rows' `prompt`) and eps*(x_t, t) its prediction under
    the empty prompt. x_t comes from sampling the frozen model with the concept prompt (classifier-free guidance
    `start_guidance`) for a random number k of the `num_inference_steps` sampling steps, t the k-th timestep of the
    sampling schedule (as in the authors' diffusers code, `esd_sd.py`; one k per batch). The formula is linear in the
    model outputs, so it holds unchanged for v-prediction models.

    Variants (which UNet parameters train; with a LoRA adapter on the UNet, its LoRA matrices inside them):
    `esd-x` cross-attention (`attn2`, for styles), `esd-u` every linear/conv layer but cross-attention (for objects
    and nudity), `esd-x-strict` only `attn2.to_k` / `attn2.to_v`, `esd-all` every linear/conv layer. With a LoRA
    adapter the frozen original is the same UNet with its adapter off (no second UNet in memory); without one the
    trainer keeps a frozen copy.

    Defaults from the paper: eta (`negative_guidance`) = 1, learning rate 1e-5 (set `learning_rate`), 1000
    iterations of batch 1 (set `max_steps`), 50 DDIM steps, start guidance 3. (The authors' later diffusers script
    uses eta = 2, lr 5e-5, 200 iterations and the concept's own prediction as the base of the target.)
    """

    name = "esd"
    paper = "https://arxiv.org/abs/2303.07345"
    needs_reference = frozenset({"scores"})  # the frozen UNet's predictions: a model, never a cache
    uses_retain = False
    config_class = ESDConfig

    def prepare_model(self, model: nn.Module) -> None:
        select_trainable(model, ESD_VARIANTS[self.variant], f"ESD variant {self.variant!r}")

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        objective = objective_of(ctx.objective)
        embeddings = objective.encode_prompts(forget["input_ids"])
        batch_size, device = embeddings.shape[0], embeddings.device
        null = objective.null_embeddings(batch_size, device)
        step = int(torch.randint(0, self.num_inference_steps, ()))
        noise = torch.randn((batch_size, *objective.latent_shape(ctx.model)), device=device)
        noise = noise * objective.sampling_scheduler.init_noise_sigma
        with frozen_reference(ctx).frozen() as original:
            x_t, t = objective.sample(
                original, embeddings, noise, self.num_inference_steps, self.start_guidance, stop_at=step
            )
            x_in = objective.sampling_scheduler.scale_model_input(x_t, t)
            eps_cond = objective.predict(original, x_in, t, embeddings)
            eps_uncond = objective.predict(original, x_in, t, null)
        target = esd_target(eps_uncond, eps_cond, self.negative_guidance)
        prediction = objective.predict(ctx.model, x_in, t, embeddings)
        loss = mean_squared_error(prediction, target).mean()
        return loss, {"esd_timestep": t.detach().float()}
