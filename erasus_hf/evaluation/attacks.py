"""Membership-inference scores, higher = more likely a member: LOSS, ZLib, Min-K%, Min-K%++, Reference, GradNorm.

Every score but GradNorm is a function of one example's teacher-forced `TokenStats` (see `scoring.py`), so one
batched pass per set serves every attack at once; GradNorm takes one backward pass per example.

Scored tokens, as open-unlearning's attacks (``src/evals/metrics/mia/``) score them on a QA row: LOSS, ZLib and
Reference average the NLL over the answer tokens AND the closing EOS (``evaluate_probability``); Min-K%, Min-K%++ and
GradNorm leave the EOS out (``tokenwise_logprobs``). Each score function takes ``score_eos`` with that default. Text
rows have no EOS: every token after the BOS is scored. Scores are signed so that higher = member (open-unlearning
reports the negation and labels the holdout 1, which gives the same AUC).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils.logging import is_progress_bar_enabled

from ..objectives import CausalLMObjective, Objective
from ..reference import eval_mode
from .base import check_fraction
from .distributed import map_sharded
from .scoring import TokenStats, mean_token_nll

GRADNORM_REDUCTIONS = ("mean", "global")

MIN_K_PLUS_PLUS_MIN_VARIANCE = 1e-6
"""Min-K%++ divides by sqrt(max(sigma^2, 1e-6)), as open-unlearning does (the paper's code divides by sigma)."""


def loss_score(stats: TokenStats, score_eos: bool = True) -> float:
    """LOSS attack (Yeom et al. 2018, "Privacy Risk in Machine Learning", arXiv:1709.01604): minus the mean token
    NLL, `-mean_t(-log p(y_t | y_<t))`. Training lowers a member's loss. The closing EOS is scored by default
    (open-unlearning's ``LOSSAttack`` reads ``evaluate_probability``)."""
    return -stats.scored(score_eos).nll


def zlib_score(stats: TokenStats, text: str, score_eos: bool = True) -> float:
    """ZLib attack (Carlini et al. 2021, "Extracting Training Data from Large Language Models", USENIX Security):
    the ratio of the log-perplexity to the zlib entropy of the text, negated so that higher = member.

    log-perplexity = the *mean* token NLL (log of the perplexity exp(mean NLL)), as in the paper's code and in the
    Min-K% / MIMIR / open-unlearning implementations, the closing EOS scored by default (open-unlearning's
    ``ZLIBAttack``); zlib entropy = `len(zlib.compress(text.encode("utf-8")))` in bytes (default level), `text` the
    scored tokens decoded with special tokens skipped (what open-unlearning compresses; `MIAEvaluator` passes it; for
    a text row it is the text). Score = -mean_NLL / zlib. A text that compresses well (repetitive, low entropy) needs
    a lower loss to look like a member.
    """
    if not text:
        raise ValueError("zlib_score needs a non-empty text.")
    return -stats.scored(score_eos).nll / len(zlib.compress(text.encode("utf-8")))


def min_k_score(stats: TokenStats, k: float = 0.4, score_eos: bool = False) -> float:
    """Min-K% Prob (Shi et al. 2024, arXiv:2310.16789): the mean of the lowest `max(1, int(n * k))` of the n token
    log-probs. The closing EOS is left out by default, as open-unlearning's ``MinKProbAttack`` does; on text rows
    every token after the BOS is scored, as MUSE's PrivLeak does."""
    check_fraction(k)
    logprobs = stats.scored(score_eos).logprobs
    n = max(1, int(len(logprobs) * k))
    return torch.topk(logprobs, n, largest=False).values.mean().item()


def min_k_plus_plus_score(stats: TokenStats, k: float = 0.4, score_eos: bool = False) -> float:
    """Min-K%++ (Zhang et al. 2024, arXiv:2404.02936): token scores (log p(y_t) - mu_t) / sigma_t, mu_t and sigma_t
    the mean and standard deviation of log p(z) for z drawn from the model's own next-token distribution; the mean
    of the lowest `max(1, int(n * k))`. As open-unlearning's ``MinKPlusPlusAttack``: the closing EOS left out by
    default, sigma_t = sqrt(max(sigma_t^2, 1e-6)) (the paper's code has no floor; it only matters where the model
    is near-certain)."""
    check_fraction(k)
    stats = stats.scored(score_eos)
    sigma = stats.std.square().clamp_min(MIN_K_PLUS_PLUS_MIN_VARIANCE).sqrt()
    token_scores = (stats.logprobs - stats.mean) / sigma
    n = max(1, int(len(token_scores) * k))
    return torch.topk(token_scores, n, largest=False).values.mean().item()


def reference_score(stats_target: TokenStats, stats_reference: TokenStats, score_eos: bool = True) -> float:
    """Reference-model attack (Carlini et al. 2021 compare the target's perplexity with a smaller model's; the
    difference form is the likelihood-ratio calibration of Watson et al. 2022 / Mireshghallah et al. 2022, the "Ref"
    attack of MIMIR, MUSE and open-unlearning): `-(NLL_target - NLL_reference)`, both the mean token NLL of the same
    example (same tokenizer; the closing EOS scored by default, as open-unlearning's ``ReferenceAttack``), the
    reference a model that never saw the data. It calibrates away how easy the example is for any model."""
    return -(stats_target.scored(score_eos).nll - stats_reference.scored(score_eos).nll)


def gradnorm_scores(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    desc: str | None = None,
    score_eos: bool = False,
    reduction: Literal["mean", "global"] = "mean",
    p: float = 2.0,
    objective: Objective | None = None,
) -> list[float]:
    """GradNorm attack (Wang et al. 2024, arXiv:2402.17012; as implemented in MIMIR and open-unlearning): minus the
    size of the gradient of the example's mean token NLL with respect to the model's parameters. Members sit near a
    minimum of the loss, so their gradients are smaller.

    `reduction="mean"` (default, the reference): the mean over parameter tensors of each tensor's p-norm,
    `-mean_theta ||d NLL / d theta||_p`, as MIMIR's and open-unlearning's ``GradNormAttack`` compute it (p = 2 in
    open-unlearning's configs). `reduction="global"`: the p-norm of the whole gradient, `-||d NLL / d params||_p`,
    the textbook gradient norm (not tied to how the parameters are split into tensors; the ranking can differ). The
    NLL leaves the closing EOS out by default (open-unlearning's ``tokenwise_logprobs``).

    One forward (`objective.score`, default `CausalLMObjective`) and one backward per example (padding stripped from
    each collated row); the batches are split across
    processes when several run (`distributed.map_sharded`). Deliberate differences from open-unlearning, which do not
    change the number for a model without dropout (Llama, Qwen, Mistral, ...): eval mode (open-unlearning switches the
    model to train mode, so dropout would make its score random), and every parameter is made to require grad for
    the call (open-unlearning takes the tensors that have a gradient, i.e. only the trainable ones; the same for a
    fully trainable model). The gradients are taken with `torch.autograd.grad`, so no `.grad` is written; the
    training mode and the `requires_grad` flags are restored after, even on error.
    """
    if reduction not in GRADNORM_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(GRADNORM_REDUCTIONS)}, got {reduction!r}")
    if p not in (1, 2, math.inf):
        raise ValueError(f"p must be 1, 2 or math.inf (the norms open-unlearning allows), got {p}")
    objective = CausalLMObjective() if objective is None else objective
    per_batch = map_sharded(
        lambda block: _gradnorm_block(model, block, desc, score_eos, reduction, p, objective), list(batches)
    )
    return [score for batch in per_batch for score in batch]


def _gradnorm_block(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    desc: str | None,
    score_eos: bool,
    reduction: str,
    norm_ord: float,
    objective: Objective,
) -> list[list[float]]:
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    device = params[0].device
    out: list[list[float]] = []
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(model), torch.enable_grad():
            for batch in tqdm(batches, desc=desc, disable=desc is None or not is_progress_bar_enabled(), leave=False):
                out.append([])
                for row, closing_eos in _unpadded_rows(batch, device):
                    nll = _example_nll(model, row, objective, drop_closing_eos=closing_eos and not score_eos)
                    grads = torch.autograd.grad(nll, params, allow_unused=True)
                    norms = torch.stack(
                        [torch.linalg.vector_norm(g.float(), ord=norm_ord) for g in grads if g is not None]
                    )
                    size = norms.mean() if reduction == "mean" else torch.linalg.vector_norm(norms, ord=norm_ord)
                    out[-1].append(-size.item())  # one sync per example
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return out


def _unpadded_rows(
    batch: dict[str, torch.Tensor], device: torch.device
) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """Each row of a collated batch alone, on `device`, its padding stripped (by the attention mask), with whether
    its last labelled token is a closing EOS."""
    closing_eos = batch.get("closing_eos")
    for b in range(batch["input_ids"].shape[0]):
        keep = batch["attention_mask"][b].bool() if "attention_mask" in batch else slice(None)
        row = {k: batch[k][b][keep][None].to(device) for k in ("input_ids", "labels", "position_ids") if k in batch}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        yield row, closing_eos is not None and bool(closing_eos[b])


def _example_nll(
    model: nn.Module, row: dict[str, torch.Tensor], objective: Objective, drop_closing_eos: bool
) -> torch.Tensor:
    """The mean token NLL (float32, with its graph) of a one-row batch, scored by `objective`; the last labelled
    token (the closing EOS) left out with `drop_closing_eos`."""
    scores = objective.score(model, row)
    mask = scores.mask.clone()
    if not mask.any():
        raise ValueError("An example has no scored token (all labels are -100).")
    if drop_closing_eos:
        mask[0, mask[0].nonzero()[-1, 0]] = False  # the closing EOS, the last labelled position
        if not mask.any():
            raise ValueError(
                "An example has no scored token once its closing EOS is left out (an empty answer); drop the row "
                "or pass score_eos=True."
            )
    return mean_token_nll(scores, row["labels"], mask)
