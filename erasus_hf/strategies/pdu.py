"""Primal-dual unlearning with a logit-margin flattening forget loss (Constrained Entropic Unlearning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..objectives import Scores
from .base import Batch, PerInstance, Strategy, StrategyContext, retain_loss
from .config import StrategyConfig
from .npo import NPO
from .registry import register_strategy

FORGET_OBJECTIVES = ("logit_margin", "ga", "npo")


def logit_margin_flattening(scores: Scores) -> torch.Tensor:
    """[B] mean over each example's answer positions of (max_v z_v - mean_v z_v)^2, z the logits that predict the
    answer token. Zero exactly when the logits are flat (the predicted distribution is uniform); no softmax."""
    mask = scores.mask
    logits = scores.logits[mask].float()  # [N, V]
    margins = (logits.max(-1).values - logits.mean(-1)) ** 2
    per_token = torch.zeros(mask.shape, dtype=margins.dtype, device=margins.device)
    per_token[mask] = margins
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1)


@dataclass
class PDUConfig(StrategyConfig):
    epsilon: float | None = field(
        default=None,
        metadata={
            "help": "Required: the bound on the retain loss (L_retain <= epsilon), above the starting model's retain "
            "loss, e.g. (1 + tolerance) x that loss; the authors used 0.3 on TOFU."
        },
    )
    eta: float = field(
        default=5.0, metadata={"help": "Dual step size of lambda's ascent (>= 0); 5: the authors' TOFU."}
    )
    initial_lambda: float = field(
        default=100.0,
        metadata={"help": "lambda at step 0, the retain weight (>= 0); 100: the authors' TOFU setting."},
    )
    warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Optimizer steps before lambda starts moving (>= 0); the authors wait 5 epochs (5 x steps per "
            "epoch), 0 starts at once."
        },
    )
    forget_objective: str = field(
        default="logit_margin",
        metadata={
            "help": "The forget term: 'logit_margin' (the paper's flattening loss), or the scalarised baselines 'ga' "
            "and 'npo'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon is None:
            raise ValueError(
                "PDU needs epsilon, the bound on the retain loss (L_retain <= epsilon): pass strategy_kwargs="
                "{'epsilon': ...}, a value above the starting model's retain loss (the authors used 0.3 on TOFU)."
            )
        if self.eta < 0:
            raise ValueError(f"PDU needs eta >= 0, got {self.eta}")
        if self.initial_lambda < 0:
            raise ValueError(f"PDU needs initial_lambda >= 0, got {self.initial_lambda}")
        if self.warmup_steps < 0:
            raise ValueError(f"PDU needs warmup_steps >= 0, got {self.warmup_steps}")
        if self.forget_objective not in FORGET_OBJECTIVES:
            raise ValueError(f"PDU forget_objective must be one of {FORGET_OBJECTIVES}, got {self.forget_objective!r}")


def reads_logits(pdu: PDU) -> bool:
    """Whether PDU's forget term reads the target tokens' logits: the logit margin does, "ga" and "npo" read
    sequence log-likelihoods."""
    return pdu.forget_objective == "logit_margin"


@register_strategy
class PDU(Strategy):
    """Primal-dual unlearning (PDU): forgetting as an objective, retention as a constraint.

    Entesari, Hatami, Khaziev, Ramakrishna, Fazlyab 2025, "Constrained Entropic Unlearning: A Primal-Dual Framework
    for Large Language Models" (arXiv:2506.05314); the authors' implementation is `PDU` of open-unlearning.

    Problem: min L_forget  s.t.  L_retain <= epsilon. Lagrangian, minimised over the model at fixed lambda:

        L = gamma * L_forget + lambda * (L_retain - epsilon)

    L_forget is the paper's logit-margin flattening loss, E_forget[ mean_{answer tokens} (max_v z_v - mean_v z_v)^2 ]
    with z the logits that predict each answer token: it drives the forget predictions to the uniform distribution
    without a softmax. L_retain is the configured retain loss (`retain_loss="nll"`: the retain answer NLL, the
    paper's cross-entropy; or "kl"). Both are means over examples (the authors' code pools the forget tokens of the
    batch, and masks the logits at the answer tokens' own positions, one position later than here).
    `forget_objective` swaps the forget term for the scalarised baselines the paper compares with: "ga" (-NLL of
    the forget answers) or "npo" (NPO's loss, beta 0.1, with a cached reference); "logit_margin" is the paper's.

    Dual ascent, once per optimizer step: lambda <- max(0, lambda + eta * (mean L_retain of the step - epsilon)).
    Every micro-batch of a step uses the lambda of the start of the step and adds its detached L_retain to a buffer;
    the first call of the next step (`ctx.global_step` larger) applies the update from the buffer's mean, so gradient
    accumulation changes nothing and the update lands where the authors' `on_step_end` callback puts it (the last
    step's update, which would affect nothing, is not applied). Steps with index < `warmup_steps` do not update
    lambda. Under `evaluate()` (`ctx.training` False) nothing is buffered or updated. Under torch.distributed the
    step's mean is averaged across processes so that every process holds the same lambda. lambda restarts at
    `initial_lambda` when a new run starts at step 0; checkpoints carry lambda and the buffered step (`state_dict`),
    so a resumed run applies the update the interrupted one was about to.

    Defaults are the authors' TOFU setting (open-unlearning `community/methods/PDU/run.sh`): initial lambda 100,
    dual step eta 5, gamma 1, lr 1e-5, 10 epochs; their TOFU epsilon was 0.3 for Llama-3 models, and the dual
    update starts after 5 warm-up *epochs* (set `warmup_steps` to 5 x steps per epoch to match; the default 0 starts
    at once). epsilon has no default: choose it above the starting model's retain loss (e.g. (1 + tolerance) x that
    loss, the paper's suggestion). `retain_weight` is not used: lambda is the retain weight.
    Logs `pdu_lambda` (the lambda of this step), `pdu_slack` = epsilon - L_retain (>= 0: constraint met) and
    `forget_loss` / `retain_loss`.
    """

    name = "pdu"
    paper = "https://arxiv.org/abs/2506.05314"
    # an instance's forget term decides; the class answers for its default, the logit margin
    token_level = PerInstance(reads_logits, class_value=True)
    stateful = True
    config_class = PDUConfig

    def __init__(self, config: PDUConfig | None = None, /, **hyperparameters: Any) -> None:
        super().__init__(config, **hyperparameters)
        self.dual = float(self.initial_lambda)
        self._step: int | None = None  # optimizer step whose micro-batch retain losses are buffered
        self._buffer: list[torch.Tensor] = []

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        needs = super().reference_quantities(retain_loss_name)
        return needs | {"sequence_logprob"} if self.forget_objective == "npo" else needs

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        if self.forget_objective == "ga":
            nll = ctx.score(forget).mean_nll.mean()
            return -nll, {"forget_nll": nll.detach()}
        if self.forget_objective == "npo":
            return NPO().forget_loss(ctx, forget)
        return logit_margin_flattening(ctx.score(forget)).mean(), {}

    def state_dict(self) -> dict[str, Any]:
        """lambda, the optimizer step whose retain violations are buffered, and those violations (float32)."""
        buffer = torch.stack(self._buffer).float() if self._buffer else torch.zeros(0)
        return {"dual": self.dual, "step": self._step, "buffer": buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"dual", "step", "buffer"}
        if unknown or "dual" not in state:
            raise ValueError(f"Not a PDU state: keys {sorted(state)} (expected 'dual', 'step', 'buffer').")
        self.dual = float(state["dual"])
        self._step = None if state.get("step") is None else int(state["step"])
        self._buffer = list(state.get("buffer", torch.zeros(0)).float().unbind(0))

    def _advance(self, step: int) -> None:
        """Enter optimizer step `step`: apply the dual update of the buffered step if it is a new one."""
        if self._step is not None and step < self._step:  # a new run: restart the dual variable
            self.dual = float(self.initial_lambda)
            self._buffer.clear()
        elif self._step is not None and step > self._step:
            if self._buffer and self._step >= self.warmup_steps:
                violation = torch.stack(self._buffer).float().mean()
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(violation)
                    violation = violation / torch.distributed.get_world_size()
                self.dual = max(0.0, self.dual + self.eta * float(violation))
            self._buffer.clear()
        self._step = step

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        """L = gamma * L_forget + lambda * (L_retain - epsilon), lambda updated by dual ascent once per step."""
        if ctx.retain_loss == "none":
            raise ValueError("PDU constrains the retain loss; retain_loss='none' leaves it nothing to constrain.")
        if retain is None:
            raise ValueError("Strategy 'pdu' needs a retain batch.")
        if ctx.training:
            self._advance(ctx.global_step)
        forget_term, metrics = self.forget_loss(ctx, forget)
        retain_term = retain_loss(ctx, retain)
        violation = retain_term - self.epsilon
        if ctx.training:
            self._buffer.append(violation.detach())
        loss = ctx.forget_weight * forget_term + self.dual * violation
        metrics = {
            **metrics,
            "forget_loss": forget_term.detach(),
            "retain_loss": retain_term.detach(),
            "pdu_lambda": torch.tensor(self.dual, device=retain_term.device),
            "pdu_slack": -violation.detach(),
        }
        return loss, metrics
