"""Selective Synaptic Dampening: a retraining-free, one-shot edit from two diagonal importance estimates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import Strategy
from .config import StrategyConfig
from .importance import side_batches, squared_gradients, trainable_parameters
from .registry import register_strategy


@torch.no_grad()
def dampen(
    params: dict[str, nn.Parameter],
    full_importance: dict[str, torch.Tensor],
    forget_importance: dict[str, torch.Tensor],
    alpha: float,
    dampening: float,
) -> float:
    """SSD's update, in place: where []_f > alpha []_D, theta <- min(lambda []_D / []_f, 1) theta. Returns the
    fraction of the parameters that were selected."""
    selected = total = 0
    for name, param in params.items():
        full, forget = full_importance[name], forget_importance[name]
        where = forget > alpha * full
        beta = (dampening * full / forget).clamp(max=1.0)
        param[where] = param[where] * beta[where].to(param.dtype)
        selected += int(where.sum())
        total += where.numel()
    return selected / total


@dataclass
class SSDConfig(StrategyConfig):
    alpha: float = field(
        default=10.0,
        metadata={"help": "Selection weighting (> 0): dampen where []_f > alpha []_D; the paper's value is 10."},
    )
    dampening: float = field(
        default=1.0,
        metadata={
            "help": "Dampening constant lambda (> 0): beta = min(lambda []_D / []_f, 1); the paper's value is 1."
        },
    )
    shuffle_seed: int = field(default=0, metadata={"help": "Seed of the shuffle of the full data's batches."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha <= 0 or self.dampening <= 0:
            raise ValueError(f"SSD needs alpha > 0 and dampening > 0, got {self.alpha}, {self.dampening}")


@register_strategy
class SSD(Strategy):
    """Selective Synaptic Dampening (SSD).

    Foster, Schoepf, Brintrup 2024, "Fast Machine Unlearning Without Retraining Through Selective Synaptic
    Dampening", AAAI (arXiv:2308.07707).

    Importances []_D (the full training data: forget + retain) and []_f (the forget set) are diagonal Fisher
    estimates: the squared gradient of the CE loss, as in the reference code the mean over mini-batches of the squared
    mini-batch gradient (batches of `per_device_train_batch_size`; the full data seeded-shuffled). Then, per
    parameter,

        theta <- beta theta where []_f > alpha []_D,  beta = min(lambda []_D / []_f, 1),  theta unchanged elsewhere.

    One-shot: `train()` computes both importances with the model in eval mode and applies the dampening; no gradient
    step. Published defaults: alpha = 10 (selection weighting), lambda = 1 (dampening constant). Needs the retain set
    (the rest of the training data). Logs `ssd_selected_fraction`.
    """

    name = "ssd"
    paper = "https://arxiv.org/abs/2308.07707"
    objectives = ("classification",)
    one_shot = True
    config_class = SSDConfig

    def needs_retain(self, retain_loss_name: str) -> bool:
        return True

    def apply(self, trainer) -> dict[str, float]:
        model, objective = trainer.model, trainer.model_objective
        data, batch_size = trainer.train_dataset, trainer.args.per_device_train_batch_size
        if data.retain is None:
            raise ValueError("SSD needs the retain set: its importances are over the full training data.")
        forget_importance = squared_gradients(
            model, objective, side_batches(trainer, data.forget, batch_size=batch_size)
        )
        full_batches = side_batches(
            trainer, data.forget, data.retain, batch_size=batch_size, shuffle_seed=self.shuffle_seed
        )
        full_importance = squared_gradients(model, objective, full_batches)
        params = trainable_parameters(model)
        selected = dampen(params, full_importance, forget_importance, self.alpha, self.dampening)
        return {"ssd_selected_fraction": selected}
