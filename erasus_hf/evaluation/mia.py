"""Membership-inference scores (higher = more likely a member), their AUC, and an evaluator running them.

Every score but GradNorm is a function of one example's teacher-forced `TokenStats` (see `scoring.py`), so one
batched pass per set serves every attack at once. In unlearning, members are the forget set and non-members a
holdout the model never trained on: an AUC near 0.5 after unlearning means the forget set looks unseen.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from datasets import Dataset
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..reference import eval_mode
from .distributed import map_sharded
from .result import EvaluationResult
from .scoring import TokenStats, dataset_batches, row_format, scored_texts, token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
"""The attacks `MIAEvaluator` runs, by name."""


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score, higher = member
    (scikit-learn). 0.5 = indistinguishable."""
    if not member_scores or not nonmember_scores:
        raise ValueError("An AUC needs at least one member and one non-member.")
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def loss_score(stats: TokenStats) -> float:
    """LOSS attack (Yeom et al. 2018, "Privacy Risk in Machine Learning", arXiv:1709.01604): minus the mean token
    NLL of the scored tokens, `-mean_t(-log p(y_t | y_<t))`. Training lowers a member's loss."""
    return -stats.nll


def zlib_score(stats: TokenStats, text: str) -> float:
    """ZLib attack (Carlini et al. 2021, "Extracting Training Data from Large Language Models", USENIX Security):
    the ratio of the log-perplexity to the zlib entropy of the text, negated so that higher = member.

    log-perplexity = the *mean* token NLL over the scored tokens (log of the perplexity exp(mean NLL)), as in the
    paper's code (the log of the model's perplexity) and in the Min-K% / MIMIR / open-unlearning implementations;
    zlib entropy = `len(zlib.compress(text.encode("utf-8")))` in bytes (default level). Score = -mean_NLL / zlib.
    A text that compresses well (repetitive, low entropy) needs a lower loss to look like a member.
    """
    if not text:
        raise ValueError("zlib_score needs a non-empty text.")
    return -stats.nll / len(zlib.compress(text.encode("utf-8")))


def min_k_score(stats: TokenStats, k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2024, arXiv:2310.16789): the mean of the lowest k fraction of the token
    log-probs (at least one token)."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    n = max(1, int(len(stats.logprobs) * k))
    return torch.topk(stats.logprobs, n, largest=False).values.mean().item()


def min_k_plus_plus_score(stats: TokenStats, k: float = 0.4) -> float:
    """Min-K%++ (Zhang et al. 2024, arXiv:2404.02936): token scores (log p(y_t) - mu_t) / sigma_t, mu_t and sigma_t
    the mean and standard deviation of log p(z) for z drawn from the model's own next-token distribution; the mean
    of the lowest k fraction."""
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")
    token_scores = (stats.logprobs - stats.mean) / stats.std.clamp_min(1e-8)
    n = max(1, int(len(token_scores) * k))
    return torch.topk(token_scores, n, largest=False).values.mean().item()


def reference_score(stats_target: TokenStats, stats_reference: TokenStats) -> float:
    """Reference-model attack (Carlini et al. 2021 compare the target's perplexity with a smaller model's; the
    difference form is the likelihood-ratio calibration of Watson et al. 2022 / Mireshghallah et al. 2022, the "Ref"
    attack of MIMIR, MUSE and open-unlearning): `-(NLL_target - NLL_reference)`, both the mean token NLL of the same
    example (same tokenizer), the reference a model that never saw the data. It calibrates away how easy the example
    is for any model."""
    return -(stats_target.nll - stats_reference.nll)


def gradnorm_scores(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    desc: str | None = None,
) -> list[float]:
    """GradNorm attack (as in MUSE / open-unlearning, after Wang et al. 2024, arXiv:2402.17012): minus the L2 norm
    of the gradient of the example's mean token NLL with respect to all the model's parameters,
    `-sqrt(sum_theta ||d NLL / d theta||^2)`. Members sit near a minimum of the loss, so their gradients are smaller.

    One forward and one backward per example (padding stripped from each collated row), in eval mode (no dropout);
    the batches are split across processes when several run (`distributed.map_sharded`).
    The gradients are taken with `torch.autograd.grad`, so no `.grad` is written; every parameter is made to require
    grad for the call, and the training mode and the `requires_grad` flags are restored after, even on error.
    (open-unlearning averages the per-tensor norms instead of taking one global norm; the ranking can differ.)
    """
    per_batch = map_sharded(lambda block: _gradnorm_block(model, block, desc), list(batches))
    return [score for batch in per_batch for score in batch]


def _gradnorm_block(model: nn.Module, batches: list[dict[str, torch.Tensor]], desc: str | None) -> list[list[float]]:
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
                for b in range(batch["input_ids"].shape[0]):
                    keep = batch["attention_mask"][b].bool() if "attention_mask" in batch else slice(None)
                    ids = batch["input_ids"][b][keep][None].to(device)
                    labels = batch["labels"][b][keep][None].to(device)
                    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                    if "position_ids" in batch:
                        inputs["position_ids"] = batch["position_ids"][b][keep][None].to(device)
                    logits = model(**inputs).logits[0, :-1].float()
                    targets = labels[0, 1:]
                    mask = targets != -100
                    if not mask.any():
                        raise ValueError("An example has no scored token (all labels are -100).")
                    nll = F.cross_entropy(logits[mask], targets[mask])
                    grads = torch.autograd.grad(nll, params, allow_unused=True)
                    norms = [torch.linalg.vector_norm(g.float()) for g in grads if g is not None]
                    out[-1].append(-torch.linalg.vector_norm(torch.stack(norms)).item())  # one sync per example
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return out


class MIAEvaluator:
    """Membership-inference AUCs of telling `members` (the forget set) from `nonmembers` (a holdout never trained
    on), one per attack in `attacks` (names in `ATTACKS`; by default all of them, "reference" only with `ref_model`).

    Rows are QA (`question`/`answer`: the answer is scored given the question, the ZLib text is the answer) or plain
    text (`text`). One `token_stats` pass per set serves loss, zlib, min_k, min_k_plus_plus and reference (the
    reference model `ref_model`, scored with the same tokenizer, gets its own pass); gradnorm runs one backward per
    example. Summary: `{name}/{attack}_auc`; per example: `{name}/{attack}_members`, `{name}/{attack}_nonmembers`
    (the scores, higher = member).
    """

    def __init__(
        self,
        members: Dataset,
        nonmembers: Dataset,
        attacks: Sequence[str] | None = None,
        k: float = 0.4,
        ref_model: nn.Module | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        name: str = "mia",
    ) -> None:
        if attacks is None:  # every attack; "reference" only when there is a reference model
            attacks = tuple(a for a in ATTACKS if a != "reference" or ref_model is not None)
        if isinstance(attacks, str):
            attacks = (attacks,)
        attacks = tuple(attacks)
        if not attacks:
            raise ValueError(f"No attack requested; choose from {list(ATTACKS)}.")
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown:
            raise ValueError(f"Unknown MIA attack(s) {unknown}; valid attacks are {list(ATTACKS)}.")
        if len(set(attacks)) != len(attacks):
            raise ValueError(f"An attack is listed twice: {list(attacks)}.")
        if "reference" in attacks and ref_model is None:
            raise ValueError(
                "The 'reference' attack needs ref_model (a model that never saw the members, same tokenizer); "
                "pass ref_model=... or drop 'reference' from attacks."
            )
        if not 0 < k <= 1:
            raise ValueError(f"k is a fraction in (0, 1], got {k}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        row_format(members, "The members dataset")
        row_format(nonmembers, "The non-members dataset")
        self.members = members
        self.nonmembers = nonmembers
        self.attacks = attacks
        self.k = k
        self.ref_model = ref_model
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name

    def _batches(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Iterator[dict[str, torch.Tensor]]:
        return dataset_batches(dataset, tokenizer, self.batch_size, self.max_length)

    def _scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, which: str
    ) -> dict[str, list[float]]:
        desc = f"{self.name}: {which}"
        stats = token_stats(model, self._batches(dataset, tokenizer), desc=desc)
        scores: dict[str, list[float]] = {}
        for attack in self.attacks:
            if attack == "loss":
                scores[attack] = [loss_score(s) for s in stats]
            elif attack == "zlib":
                texts = scored_texts(dataset)
                scores[attack] = [zlib_score(s, t) for s, t in zip(stats, texts, strict=True)]
            elif attack == "min_k":
                scores[attack] = [min_k_score(s, self.k) for s in stats]
            elif attack == "min_k_plus_plus":
                scores[attack] = [min_k_plus_plus_score(s, self.k) for s in stats]
            elif attack == "gradnorm":
                batches = self._batches(dataset, tokenizer)
                scores[attack] = gradnorm_scores(model, batches, desc=f"{desc} gradnorm")
            elif attack == "reference":
                batches = self._batches(dataset, tokenizer)
                ref = token_stats(self.ref_model, batches, desc=f"{desc} reference model")
                scores[attack] = [reference_score(s, r) for s, r in zip(stats, ref, strict=True)]
        return scores

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """AUC and per-example scores of every attack. `reference` is unused (kept for the evaluator interface)."""
        members = self._scores(model, tokenizer, self.members, "members")
        nonmembers = self._scores(model, tokenizer, self.nonmembers, "non-members")
        result = EvaluationResult(
            meta={
                self.name: {
                    "attacks": list(self.attacks),
                    "k": self.k,
                    "num_members": len(self.members),
                    "num_nonmembers": len(self.nonmembers),
                    "rows": row_format(self.members, "The members dataset"),
                    "scores": "higher = member; AUC 0.5 = members indistinguishable from non-members",
                }
            }
        )
        for attack in self.attacks:
            result.summary[f"{self.name}/{attack}_auc"] = auc(members[attack], nonmembers[attack])
            result.per_example[f"{self.name}/{attack}_members"] = members[attack]
            result.per_example[f"{self.name}/{attack}_nonmembers"] = nonmembers[attack]
        return result
