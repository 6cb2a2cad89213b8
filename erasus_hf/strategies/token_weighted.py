"""Token-level forget losses: reweighted gradient ascent (WGA, SatImp) and distillation towards a target
distribution with the true token pushed down (UNDIAL, CE-U).

Every loss is a mean over forget examples of a per-example quantity, itself a mean over that example's answer tokens
(positions labelled -100 never count), so gradient accumulation over micro-batches stays exact. The published code of
WGA, SatImp and CE-U averages over all answer tokens of a batch instead; the two agree when the answers have the same
length. Logits are only upcast to float32 at the answer positions ([N, V], never [B, T, V]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..objectives import Scores
from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


def example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean of `values` over each example's scored tokens. `values` is [B, T] (read where `mask`) or [N], one
    value per True of `mask` in row-major order (the order of `x[mask]`). An example with no scored token gives 0."""
    if values.shape != mask.shape:
        full = values.new_zeros(mask.shape)
        full[mask] = values
        values = full
    total = values.masked_fill(~mask, 0).sum(-1)
    return total / mask.sum(-1).clamp_min(1).to(total.dtype)


def aligned_targets(scores: Scores, batch: Batch) -> torch.Tensor:
    """[B, T] the target token of every scored position, aligned with `scores.mask`.

    Objectives score the last T labels (a causal LM drops the first when it shifts, a classifier scores its one
    label), so the targets are `labels[:, -T:]`. Checked against the mask, so a misaligned objective fails loudly.
    """
    labels = batch["labels"]
    if labels.dim() == 1:
        labels = labels[:, None]
    length = scores.mask.shape[-1]
    targets = labels[:, labels.shape[-1] - length :].to(scores.mask.device)
    if targets.shape != scores.mask.shape or not torch.equal(targets != -100, scores.mask):
        raise ValueError(
            f"Cannot align labels {tuple(batch['labels'].shape)} with the scored positions {tuple(scores.mask.shape)}."
        )
    return targets


def _forget_nll(scores: Scores) -> torch.Tensor:
    return scores.mean_nll.detach().float().mean()


@dataclass
class WGAConfig(StrategyConfig):
    beta: float = field(
        default=1.0,
        metadata={
            "help": "Exponent of the token weight p_t^beta (>= 0; 0 is plain gradient ascent); 1: open-unlearning's "
            "WGA config (the authors tune it per run)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"WGA needs beta >= 0, got {self.beta}")


@register_strategy
class WGA(Strategy):
    """Weighted Gradient Ascent: gradient ascent with each token weighted by its own (detached) likelihood.

    Wang, Zhang, Yang, Liu, Han 2025, "Rethinking LLM Unlearning Objectives: A Gradient Perspective and Go Beyond"
    (ICLR 2025, arXiv:2502.19301).

    L_WGA = -E_forget[ mean_t w_t * l_t ], l_t = -log p_theta(y_t | x, y_<t) the answer token's NLL and
    w_t = p_t^beta with p_t = exp(-l_t) DETACHED (a weight, not a path for the gradient). Tokens already forgotten
    (p_t -> 0) stop pushing, which is what keeps GA from collapsing. L = gamma L_WGA + alpha L_retain.
    beta = 1 (open-unlearning's WGA config, lr 1e-5 for 5 epochs with gamma = alpha = 1 and an NLL retain term; the
    authors' G-effect code tunes beta per run). Logs `forget_nll` and `wga_weight`, the mean w_t.
    """

    name = "wga"
    paper = "https://arxiv.org/abs/2502.19301"
    token_level = True
    config_class = WGAConfig

    def weights(self, prob: torch.Tensor) -> torch.Tensor:
        return prob**self.beta

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        scores = ctx.score(forget)
        nll = -scores.token_logprobs.float()  # [B, T], 0 where masked
        weight = self.weights(torch.exp(-nll.detach()))
        loss = -example_mean(weight * nll, scores.mask).mean()
        mean_weight = weight[scores.mask].mean() if scores.mask.any() else weight.new_zeros(())
        return loss, {"forget_nll": _forget_nll(scores), f"{self.name}_weight": mean_weight.detach()}


@dataclass
class SatImpConfig(StrategyConfig):
    beta1: float = field(
        default=5.0,
        metadata={"help": "Exponent of the saturation weight p_t^beta1 (>= 0); 5: the paper's setting."},
    )
    beta2: float = field(
        default=1.0,
        metadata={"help": "Exponent of the importance weight (1 - p_t)^beta2 (>= 0); 1: the paper's setting."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta1 < 0 or self.beta2 < 0:
            raise ValueError(f"SatImp needs beta1, beta2 >= 0, got {self.beta1}, {self.beta2}")


@register_strategy
class SatImp(WGA):
    """SatImp: gradient ascent with each token weighted for saturation and importance.

    Yang, Wang, Huang, Liu, Zhang, Han 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning"
    (ICML 2025, arXiv:2505.11953).

    L_SatImp = -E_forget[ mean_t p_t^beta1 (1 - p_t)^beta2 * l_t ], l_t the answer token's NLL, p_t = exp(-l_t)
    DETACHED. The terms are named as in open-unlearning's `compute_satimp_loss` (`weight_sat = p^beta1`,
    `weight_imp = (1 - p)^beta2`): p^beta1 is the saturation weight (it fades once a token is unlikely, i.e. already
    unlearned), (1 - p)^beta2 the importance weight (it takes the weight off tokens that are near-certain).
    L = gamma L_SatImp + alpha L_retain.
    beta1 = 5, beta2 = 1, the paper's setting as open-unlearning's SatImp documents and implements it. The paper's
    TOFU runs weight retain ten times forget (open-unlearning: gamma = 0.1, alpha = 1, lr 1e-5, 5 epochs); set
    `forget_weight` / `retain_weight` for that. Logs `forget_nll` and `satimp_weight`, the mean weight.
    """

    name = "satimp"
    paper = "https://arxiv.org/abs/2505.11953"
    config_class = SatImpConfig  # its own weights, not WGA's beta

    def weights(self, prob: torch.Tensor) -> torch.Tensor:
        saturation, importance = prob**self.beta1, (1 - prob) ** self.beta2
        return saturation * importance


def _soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[N] -sum_v softmax(target_logits)_v log softmax(logits)_v, both [N, V] (targets carry no gradient)."""
    target = torch.softmax(target_logits.detach().float(), dim=-1)
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(target * log_p).sum(-1)


@dataclass
class UNDIALConfig(StrategyConfig):
    beta: float = field(
        default=10.0,
        metadata={
            "help": "How far the true token's reference logit is lowered in the target (>= 0); 10: open-unlearning's "
            "UNDIAL config (the paper searches 3, 10, 30)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ValueError(f"UNDIAL needs beta >= 0, got {self.beta}")


@register_strategy
class UNDIAL(Strategy):
    """UNDIAL: self-distillation towards the reference's distribution with the true token's logit lowered.

    Dong, Lin, Belkin, Huerta, Vulić 2024, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
    Large Language Models" (NAACL 2025, arXiv:2402.10052).

    For every answer token, q = softmax(z_ref - beta * onehot(y_t)), z_ref the frozen starting model's logits, and
    L_UNDIAL = E_forget[ mean_t CE(q, p_theta) ] = E_forget[ mean_t -sum_v q_v log p_theta(v | x, y_<t) ].
    The target is fixed (it moves no further once reached), so the loss is bounded and unlearning is gentle.
    beta = 10 (open-unlearning's UNDIAL config; the paper searches beta in {3, 10, 30}, LoRA r 8, lr 1e-4).
    The paper uses no retain set (alpha = 0: `retain_loss="none"`); L = gamma L_UNDIAL + alpha L_retain otherwise.
    Needs the reference's logits (`reference="adapter"` with LoRA costs no extra weights). Logs `forget_nll` and
    `undial_target_prob`, the mean probability q gives the true token.
    """

    name = "undial"
    paper = "https://arxiv.org/abs/2402.10052"
    needs_reference = frozenset({"scores"})
    token_level = True
    config_class = UNDIALConfig

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        reference = ctx.require_reference().scores(ctx.objective, forget)  # before the policy pass, see reference.py
        scores = ctx.score(forget)
        mask = scores.mask
        targets = aligned_targets(scores, forget)[mask]  # [N], never -100
        ref_logits = reference.logits[mask].float()  # [N, V]
        rows = torch.arange(targets.shape[0], device=targets.device)
        ref_logits[rows, targets] -= self.beta
        per_token = _soft_cross_entropy(ref_logits, scores.logits[mask])
        loss = example_mean(per_token, mask).mean()
        target_prob = torch.softmax(ref_logits, dim=-1)[rows, targets]
        target_prob = target_prob.mean() if targets.numel() else target_prob.new_zeros(())
        return loss, {"forget_nll": _forget_nll(scores), "undial_target_prob": target_prob.detach()}


@dataclass
class CEUConfig(StrategyConfig):
    ignore_first_token: bool = field(
        default=True,
        metadata={
            "help": "Leave each answer's first token out of the mean; true: open-unlearning's CE-U "
            "(`ignore_first_n_answer_tokens: 1`), after a footnote to the paper's training settings."
        },
    )


@register_strategy
class CEU(Strategy):
    """CE-U (Cross Entropy Unlearning): cross-entropy towards the model's own distribution without the true token.

    Yang 2025, "CE-U: Cross Entropy Unlearning" (arXiv:2503.01224).

    For every answer token, q = softmax(z'), z' the DETACHED current logits with z'_{y_t} = -inf, and
    L_CE-U = E_forget[ mean_t CE(q, p_theta) ] = E_forget[ mean_t -sum_{v != y_t} q_v log p_theta(v | x, y_<t) ].
    Its gradient on the logits is p_theta - q: bounded, unlike GA's, and it does not vanish when p(y_t) -> 1.
    `ignore_first_token` leaves each answer's first token out of the mean (a trick from a footnote to the paper's
    training settings); default True, as in open-unlearning's CE-U (`ignore_first_n_answer_tokens: 1`). The paper
    uses no retain set and no reference (`retain_loss="none"`); L = gamma L_CE-U + alpha L_retain otherwise.
    Logs `forget_nll`.
    """

    name = "ce_u"
    paper = "https://arxiv.org/abs/2503.01224"
    token_level = True
    config_class = CEUConfig

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        scores = ctx.score(forget)
        mask = scores.mask
        targets = aligned_targets(scores, forget)
        if self.ignore_first_token:
            mask = mask & (mask.cumsum(-1) > 1)
        targets = targets[mask]  # [N], never -100
        logits = scores.logits[mask]  # [N, V]
        rows = torch.arange(targets.shape[0], device=targets.device)
        target_logits = logits.detach().float().clone()
        target_logits[rows, targets] = float("-inf")
        per_token = _soft_cross_entropy(target_logits, logits)
        loss = example_mean(per_token, mask).mean()
        return loss, {"forget_nll": _forget_nll(scores)}
