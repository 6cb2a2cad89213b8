"""Negative Preference Optimization and its reference-free variant SimNPO."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


@dataclass
class NPOConfig(StrategyConfig):
    beta: float = field(
        default=0.1,
        metadata={"help": "Inverse temperature of the log-sigmoid (> 0); 0.1: the TOFU setting."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"NPO needs beta > 0, got {self.beta}")


@register_strategy
class NPO(Strategy):
    """Negative Preference Optimization.

    Zhang, Lin, Bai, Mei 2024, "Negative Preference Optimization: Towards Catastrophic Collapse to Effective
    Unlearning" (arXiv:2404.05868).

    L_NPO = -(2/beta) E_forget[ log sigmoid(-beta (log pi_theta(y|x) - log pi_ref(y|x))) ],
    log pi(y|x) the sum of the answer tokens' log-probs (the prompt is masked). L = gamma L_NPO + alpha L_retain
    (NPO+RT in the paper). beta = 0.1 (the paper's TOFU setting). As beta -> 0 the gradient tends to GA's; the
    sigmoid weight makes it vanish once the forget answer is unlikely, which is what avoids collapse.
    Logs `npo_log_ratio`, the mean of log pi_theta - log pi_ref on the forget batch.
    """

    name = "npo"
    paper = "https://arxiv.org/abs/2404.05868"
    needs_reference = frozenset({"sequence_logprob"})
    config_class = NPOConfig

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        ref_logprob = ctx.require_reference().sequence_logprob(ctx.objective, forget)
        log_ratio = ctx.score(forget).sequence_logprob - ref_logprob
        loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio).mean()
        return loss, {"npo_log_ratio": log_ratio.detach().mean()}


MARGIN_FORMS = ("outside_beta", "inside_beta")


@dataclass
class SimNPOConfig(StrategyConfig):
    beta: float = field(default=2.5, metadata={"help": "Inverse temperature (> 0); 2.5 is the paper's TOFU setting."})
    gamma_margin: float = field(default=0.0, metadata={"help": "Reward margin gamma (0 on TOFU)."})
    margin_form: str = field(
        default="outside_beta",
        metadata={
            "help": "'outside_beta': the paper's -(beta/|y|) log pi - gamma_margin; 'inside_beta': the code's "
            "beta (-(1/|y|) log pi - gamma_margin)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"SimNPO needs beta > 0, got {self.beta}")
        if self.margin_form not in MARGIN_FORMS:
            raise ValueError(
                f"SimNPO margin_form must be one of {MARGIN_FORMS}, got {self.margin_form!r}: 'outside_beta' is the "
                "paper's -(beta/|y|) log pi - gamma_margin, 'inside_beta' the authors' code's beta (-(1/|y|) log pi - "
                "gamma_margin)."
            )


@register_strategy
class SimNPO(Strategy):
    """Simple NPO: NPO without a reference model, on the length-normalised likelihood.

    Fan, Liu, Lin, Jia, Zhang, Mei, Liu 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for
    LLM Unlearning" (arXiv:2410.07163).

    L_SimNPO = -(2/beta) E_forget[ log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma_margin) ], |y| the number of
    answer tokens: the paper's form, the margin outside beta (`margin_form="outside_beta"`, the default).
    The authors' code (github.com/OPTML-Group/Unlearn-Simple, TOFU `dataloader.py` and MUSE `iterative.py`) and
    open-unlearning's `SimNPO` put the margin inside: -(2/beta) log sigmoid(beta (-(1/|y|) log pi_theta(y|x) -
    gamma)), i.e. their gamma (open-unlearning: `delta`) is our gamma_margin / beta. `margin_form="inside_beta"`
    reads `gamma_margin` as that gamma. With gamma_margin = 0 the two forms are the same loss.
    L = gamma L_SimNPO + alpha L_retain. Defaults are the paper's TOFU setting: beta = 2.5, gamma_margin = 0 (the
    authors' TOFU config: beta 2.5, gamma 0, forget coefficient 0.1375; the paper tunes the retain weight per task:
    set `forget_weight` / `retain_weight`).
    """

    name = "simnpo"
    paper = "https://arxiv.org/abs/2410.07163"

    config_class = SimNPOConfig

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        scores = ctx.score(forget)
        normalised = scores.sequence_logprob / scores.num_tokens.clamp_min(1)
        if self.margin_form == "outside_beta":
            logit = -self.beta * normalised - self.gamma_margin
        else:
            logit = self.beta * (-normalised - self.gamma_margin)
        loss = -(2.0 / self.beta) * F.logsigmoid(logit).mean()
        return loss, {"forget_nll": -normalised.detach().mean()}
