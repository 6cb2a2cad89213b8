"""Negative Preference Optimization and its reference-free variant SimNPO."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Batch, Strategy, StrategyContext
from .registry import register_strategy


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

    def __init__(self, beta: float = 0.1) -> None:
        if beta <= 0:
            raise ValueError(f"NPO needs beta > 0, got {beta}")
        self.beta = beta

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        ref_logprob = ctx.require_reference().sequence_logprob(ctx.objective, forget)
        log_ratio = ctx.score(forget).sequence_logprob - ref_logprob
        loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio).mean()
        return loss, {"npo_log_ratio": log_ratio.detach().mean()}


@register_strategy
class SimNPO(Strategy):
    """Simple NPO: NPO without a reference model, on the length-normalised likelihood.

    Fan, Liu, Lin, Jia, Zhang, Mei, Liu 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for
    LLM Unlearning" (arXiv:2410.07163).

    L_SimNPO = -(2/beta) E_forget[ log sigmoid(-(beta/|y|) log pi_theta(y|x) - gamma_margin) ], |y| the number of
    answer tokens. L = gamma L_SimNPO + alpha L_retain. Defaults are the paper's TOFU setting: beta = 2.5,
    gamma_margin = 0 (the paper tunes the retain weight per task; set `retain_weight`).
    """

    name = "simnpo"
    paper = "https://arxiv.org/abs/2410.07163"

    def __init__(self, beta: float = 2.5, gamma_margin: float = 0.0) -> None:
        if beta <= 0:
            raise ValueError(f"SimNPO needs beta > 0, got {beta}")
        self.beta = beta
        self.gamma_margin = gamma_margin

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        scores = ctx.score(forget)
        normalised = scores.sequence_logprob / scores.num_tokens.clamp_min(1)
        loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * normalised - self.gamma_margin).mean()
        return loss, {"forget_nll": -normalised.detach().mean()}
