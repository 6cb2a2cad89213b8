"""Gradient ascent and gradient difference."""

from __future__ import annotations

from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


@register_strategy
class GradientAscent(Strategy):
    """Gradient ascent (GA) on the forget set.

    Jang et al. 2023, "Knowledge Unlearning for Mitigating Privacy Risks in Language Models" (arXiv:2210.01504); the
    GA baseline of TOFU (Maini et al. 2024).

    L = -NLL(forget), NLL the mean token negative log-likelihood of each forget answer, averaged over examples. No
    retain term and no reference. No hyperparameters; the published runs use a small learning rate (1e-5) for a few
    epochs, since the loss is unbounded below.
    """

    name = "ga"
    paper = "https://arxiv.org/abs/2210.01504"
    uses_retain = False
    config_class = StrategyConfig  # no hyperparameters (GradDiff inherits this)

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        nll = ctx.score(forget).mean_nll.mean()
        return -nll, {"forget_nll": nll.detach()}


@register_strategy
class GradDiff(GradientAscent):
    """Gradient difference: ascend on forget, descend on retain.

    Liu et al. 2022, "Continual Learning and Private Unlearning" (arXiv:2203.12817); the "Grad. Diff." baseline of
    TOFU (Maini et al. 2024, arXiv:2401.06121).

    L = -gamma NLL(forget) + alpha L_retain, L_retain = NLL(retain) (`retain_loss="nll"`, the published form) or
    KL(pi_ref || pi_theta) on retain answer tokens (`retain_loss="kl"`, TOFU's KL baseline). gamma = alpha = 1.
    """

    name = "grad_diff"
    paper = "https://arxiv.org/abs/2203.12817"
    uses_retain = True
