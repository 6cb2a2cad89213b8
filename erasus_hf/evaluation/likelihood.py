"""Batched answer likelihoods and the TOFU truth ratio (the TOFU evaluator builds on the truth ratio).

P(answer | question) = exp(-mean token NLL over the answer tokens and the closing EOS) (TOFU's length-normalised
probability; open-unlearning's ``evaluate_probability`` scores the EOS too).
`answer_nll` scores with the objective's fused cross-entropy (no full-vocabulary log-softmax), the cheap path when
only the NLL is needed; `scoring.token_stats` gives the fuller per-token statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..data.formats import TextFormat
from ..objectives import CausalLMObjective, Objective
from .scoring import check_qa_format, evaluation_format, qa_batches, score_batch


def answer_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
    max_length: int = 512,
    desc: str | None = None,
    objective: Objective | None = None,
    text_format: TextFormat | None = None,
) -> torch.Tensor:
    """[N] mean token NLL of each answer given its question (prompt masked, the closing EOS scored), in the unlearning
    collator's layout of `text_format` (None: `TextFormat()`, the chat template when the tokenizer has one), scored by
    `objective` (default: `CausalLMObjective`) in eval mode without gradients."""
    objective = CausalLMObjective() if objective is None else objective
    text_format = evaluation_format(text_format)
    check_qa_format(text_format, tokenizer, "answer_nll")
    batches = tqdm(
        qa_batches(tokenizer, questions, answers, batch_size, max_length, text_format),
        total=-(-len(answers) // batch_size),
        desc=desc,
        disable=desc is None or not is_progress_bar_enabled(),
        leave=False,
    )
    out = [score_batch(model, batch, objective)[1].mean_nll.float().cpu() for batch in batches]
    return torch.cat(out) if out else torch.empty(0)


def truth_ratio(true_nll: torch.Tensor, perturbed_nll: torch.Tensor) -> torch.Tensor:
    """[N] TOFU truth ratio R = P_wrong / P_true.

    P_true = exp(-NLL of the paraphrased (or original) answer), P_wrong the geometric mean over the perturbed answers
    of exp(-NLL), so log R = mean_j(-nll_j) + nll_true. `perturbed_nll` is [N, K].
    """
    return torch.exp(-perturbed_nll.mean(-1) + true_nll)


def truth_ratio_score(ratios: torch.Tensor, forget: bool) -> float:
    """TOFU's aggregate: mean(min(R, 1/R)) on the forget set (1 = no preference, forgotten), mean(max(0, 1 - R))
    on the other sets (1 = the true answer is far likelier, knowledge kept)."""
    if forget:
        return torch.minimum(ratios, 1 / ratios).mean().item()
    return torch.clamp(1 - ratios, min=0).mean().item()
