"""l1-sparse unlearning: retain fine-tuning with a decaying l1 penalty on the weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


def linear_decay(gamma: float, step: int, total_steps: int) -> float:
    """gamma_t = gamma (1 - t / T): gamma at the first step, decaying linearly to 0 at the end of training."""
    if total_steps <= 0:
        raise ValueError(f"The l1 schedule needs the number of training steps, got {total_steps}")
    return gamma * max(0.0, 1.0 - step / total_steps)


def l1_norm(model: torch.nn.Module) -> torch.Tensor:
    """||theta||_1 over the trained parameters."""
    return sum(p.abs().sum() for p in model.parameters() if p.requires_grad)


@dataclass
class L1SparseConfig(StrategyConfig):
    gamma: float = field(
        default=5e-4,
        metadata={
            "help": "Weight (>= 0) of the l1 penalty at the first step, decaying linearly to 0; 5e-4, the paper's "
            "CIFAR-10 value as we read it."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma < 0:
            raise ValueError(f"l1_sparse needs gamma >= 0, got {self.gamma}")


@register_strategy
class L1Sparse(Strategy):
    """l1-sparse MU (sparsity-aware unlearning).

    Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu 2023, "Model Sparsity Can Simplify Machine Unlearning", NeurIPS
    (arXiv:2304.04934).

    L = CE(retain) + gamma_t ||theta||_1, gamma_t = gamma (1 - t / T), t the optimizer step and T the run's total
    steps (the paper's linearly decaying scheduler, which beats a constant gamma; the released `FT_l1` decays it per
    epoch, gamma (1 - e / E)). gamma = 5e-4, the paper's CIFAR-10 value as we read it (the released code takes it as
    `--alpha` with no method-specific default), with fine-tuning at learning rate 0.01 for 10 epochs.

    Fine-tuning on the retain set only: the forget set defines what is not retained, and the forget batches are not
    scored (the trainer's epoch is the forget set's length; set `max_steps` for E passes over the retain set).
    `retain_loss`, `forget_weight` and `retain_weight` are not used. The trained parameters are those that require a
    gradient (the adapter under PEFT). Logs `l1_gamma` and `l1_norm`.
    """

    name = "l1_sparse"
    paper = "https://arxiv.org/abs/2304.04934"
    objectives = ("classification",)
    config_class = L1SparseConfig

    def __init__(self, config: L1SparseConfig | None = None, /, **hyperparameters: Any) -> None:
        super().__init__(config, **hyperparameters)
        self._trainer = None  # the running trainer (its state holds the run's total steps), set by `setup`
        self._last_total_steps: int | None = None  # the finished run's length, for a later evaluate()

    def needs_retain(self, retain_loss_name: str) -> bool:
        return True

    def setup(self, trainer) -> dict[str, float]:
        """Remember the trainer: its state knows the run's total steps once training starts (for gamma_t)."""
        self._trainer = trainer
        return {}

    def teardown(self) -> None:
        self._last_total_steps = self._trainer.state.max_steps if self._trainer is not None else None
        self._trainer = None

    def gamma_at(self, step: int) -> float:
        """gamma_t of this run at optimizer step `step` (gamma before any step)."""
        if step == 0:
            return self.gamma
        total = self._trainer.state.max_steps if self._trainer is not None else self._last_total_steps
        if total is None:
            raise RuntimeError(
                "l1_sparse's gamma schedule needs the run length; train through UnlearningTrainer.train()."
            )
        return linear_decay(self.gamma, step, total)

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        if retain is None:
            raise ValueError("l1_sparse fine-tunes on the retain set and needs a retain batch.")
        gamma = self.gamma_at(ctx.global_step)
        ce = ctx.score(retain).mean_nll.mean()
        norm = l1_norm(ctx.model)
        return ce + gamma * norm, {
            "retain_loss": ce.detach(),
            "l1_gamma": torch.tensor(gamma),
            "l1_norm": norm.detach(),
        }
