"""What the diffusion strategies share: the base class, choosing which UNet parameters train, and the prompt
embeddings of a batch side."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..strategies.base import Batch, Strategy, StrategyContext
from .lora import has_lora
from .objective import DiffusionObjective, UNetReference

# Which modules a parameter group covers, by the module's name in the UNet (diffusers' names: `attn1` is
# self-attention, `attn2` cross-attention on the prompt).
PARAMETER_GROUPS: dict[str, Callable[[str], bool]] = {
    "cross_attention": lambda name: "attn2" in name,
    "cross_attention_kv": lambda name: "attn2.to_k" in name or "attn2.to_v" in name,
    "non_cross_attention": lambda name: "attn2" not in name,
    "all": lambda name: True,
}


def select_trainable(unet: nn.Module, group: str, why: str) -> list[str]:
    """Train only the parameters of `group`: the weights of the matching `nn.Linear` / `nn.Conv2d` modules or,
    when the UNet carries a LoRA adapter, the trainable LoRA matrices inside them. Everything else is frozen.
    Returns the names of the trained parameters; fails when the group matches none."""
    matches = PARAMETER_GROUPS[group]
    lora = has_lora(unet)
    keep: dict[str, nn.Parameter] = {}
    for module_name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not matches(module_name):
            continue
        for param_name, param in module.named_parameters(prefix=module_name):
            if not lora or (".lora_" in param_name and param.requires_grad):
                keep[param_name] = param
    if not keep:
        hint = " Add those modules to the LoRA target_modules." if lora else ""
        raise ValueError(f"{why}: no {'LoRA ' if lora else ''}parameter of the UNet matches {group!r}.{hint}")
    unet.requires_grad_(False)
    for param in keep.values():
        param.requires_grad_(True)
    return sorted(keep)


class DiffusionStrategy(Strategy):
    """Base of the concept-erasure strategies: they serve the diffusion objective only, and their retain term is the
    standard denoising loss on the retain prompts and images (`retain_loss="nll"`, the objective's score) or none."""

    objectives = ("diffusion",)

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        if ctx.retain_loss not in ("nll", "none"):
            raise ValueError(
                f"Strategy {self.name!r}: the diffusion retain term is the denoising loss (retain_loss='nll') or "
                f"none, not {ctx.retain_loss!r}."
            )
        return super().compute_loss(ctx, forget, retain)


def objective_of(objective: object) -> DiffusionObjective:
    """`objective` (a step's `ctx.objective`, or the trainer's `model_objective`), refused unless diffusion's."""
    if not isinstance(objective, DiffusionObjective):
        raise TypeError(f"Diffusion strategies need a DiffusionObjective, got {type(objective).__name__}.")
    return objective


def frozen_reference(ctx: StrategyContext) -> UNetReference:
    reference = ctx.require_reference()
    if not isinstance(reference, UNetReference):
        raise TypeError(f"Diffusion strategies need the frozen UNet as reference, got {type(reference).__name__}.")
    return reference


def mean_squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean over each example's elements of (prediction - target)^2, in float32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
