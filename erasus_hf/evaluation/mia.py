"""Membership-inference scores (higher = more likely a member), their AUC, and an evaluator running them.

Every score but GradNorm is a function of one example's teacher-forced `TokenStats` (see `scoring.py`), so one
batched pass per set serves every attack at once. In unlearning, members are the forget set and non-members a
holdout the model never trained on: an AUC near 0.5 after unlearning means the forget set looks unseen.

Scored tokens, as open-unlearning's attacks (``src/evals/metrics/mia/``) score them on a QA row: LOSS, ZLib and
Reference average the NLL over the answer tokens AND the closing EOS (``evaluate_probability``); Min-K%, Min-K%++ and
GradNorm leave the EOS out (``tokenwise_logprobs``). Each score function takes ``score_eos`` with that default;
``MIAEvaluator(score_eos=True/False)`` forces one choice for every attack. Text rows have no EOS: every token after
the BOS is scored. Scores are signed so that higher = member (open-unlearning reports the negation and labels the
holdout 1, which gives the same AUC).

Too little data. An empty side is refused (an AUC needs a member and a non-member); fewer than `MIN_ROWS_PER_SIDE`
rows on a side draw a warning (with one row a side every AUC is 0, 0.5 or 1 whatever the model). Every AUC comes with a
95% confidence interval (`auc_interval`): the percentile bootstrap of `scipy.stats.bootstrap`, 1000 resamples,
seeded, members and non-members resampled separately (a stratified bootstrap, so that every resample holds both
classes, as an AUC needs).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from scipy.stats import bootstrap, rankdata
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..data.fingerprint import describe_rows
from ..reference import eval_mode
from .distributed import map_sharded
from .result import EvaluationResult
from .scoring import TokenStats, dataset_batches, row_format, token_stats

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus", "gradnorm", "reference")
"""The attacks `MIAEvaluator` runs, by name."""

EOS_SCORED = {
    "loss": True,
    "zlib": True,
    "reference": True,
    "min_k": False,
    "min_k_plus_plus": False,
    "gradnorm": False,
}
"""Whether each attack scores the closing EOS of a QA row by default (open-unlearning's choice for that attack)."""

GRADNORM_REDUCTIONS = ("mean", "global")

MIN_K_PLUS_PLUS_MIN_VARIANCE = 1e-6
"""Min-K%++ divides by sqrt(max(sigma^2, 1e-6)), as open-unlearning does (the paper's code divides by sigma)."""


MIN_ROWS_PER_SIDE = 20
"""Fewer rows than this on the member or the non-member side draw a warning: the AUC moves in steps of
1 / (members x non-members) and its confidence interval spans much of [0, 1] (with 20 a side, a model that cannot
tell the sides apart still gives an interval about 0.35 wide)."""

BOOTSTRAP_RESAMPLES = 1000
CI_LEVEL = 0.95
CI_METHOD = "percentile bootstrap (scipy.stats.bootstrap), members and non-members resampled separately"


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of telling members (label 1) from non-members (label 0) by score, higher = member
    (scikit-learn). 0.5 = indistinguishable."""
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError(
            f"An AUC needs at least one member and one non-member; got {len(member_scores)} member and "
            f"{len(nonmember_scores)} non-member scores."
        )
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, list(member_scores) + list(nonmember_scores)))


def _rank_auc(members: np.ndarray, nonmembers: np.ndarray, axis: int = -1) -> np.ndarray:
    """The AUC along `axis` of batched samples, by the Mann-Whitney rank sum (ties count one half, as
    `roc_auc_score`): ``(R_members - m (m + 1) / 2) / (m n)``. Vectorised for `scipy.stats.bootstrap`."""
    members, nonmembers = np.moveaxis(members, axis, -1), np.moveaxis(nonmembers, axis, -1)
    m, n = members.shape[-1], nonmembers.shape[-1]
    batch = np.broadcast_shapes(members.shape[:-1], nonmembers.shape[:-1])
    both = [np.broadcast_to(members, (*batch, m)), np.broadcast_to(nonmembers, (*batch, n))]
    ranks = rankdata(np.concatenate(both, axis=-1), axis=-1)
    return (ranks[..., :m].sum(-1) - m * (m + 1) / 2) / (m * n)


def auc_interval(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float]:
    """(low, high): the `level` confidence interval of `auc`, by the percentile bootstrap of
    `scipy.stats.bootstrap` with `resamples` resamples and the generator seeded with `seed`, members and non-members
    resampled separately (`paired=False`: every resample keeps both sides' sizes, so both classes are present).

    A side with a single row cannot be resampled (scipy needs two); the interval is then the whole (0.0, 1.0): one
    row says nothing about how the AUC would vary."""
    members, nonmembers = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("An AUC interval needs at least one member and one non-member.")
    if len(members) < 2 or len(nonmembers) < 2:
        return 0.0, 1.0
    result = bootstrap(
        (members, nonmembers),
        _rank_auc,
        n_resamples=resamples,
        batch=100,
        vectorized=True,
        paired=False,
        confidence_level=level,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def interval_entry(low: float, high: float, resamples: int, seed: int, level: float = CI_LEVEL) -> dict[str, Any]:
    """An `EvaluationResult.intervals` entry."""
    return {"low": low, "high": high, "level": level, "method": CI_METHOD, "resamples": resamples, "seed": seed}


def warn_few_rows(counts: Mapping[str, int], what: str) -> None:
    """Warn when a side of `counts` (side name -> rows) has fewer than `MIN_ROWS_PER_SIDE` rows."""
    few = {side: n for side, n in counts.items() if n < MIN_ROWS_PER_SIDE}
    if few:
        listed = ", ".join(f"{n} {side} row{'s' if n != 1 else ''}" for side, n in few.items())
        warnings.warn(
            f"{what}: only {listed} (fewer than {MIN_ROWS_PER_SIDE} a side): the AUC moves in coarse steps (with "
            "one row a side it is 0, 0.5 or 1 whatever the model) and its confidence interval (result.intervals) "
            "is wide; evaluate more rows.",
            UserWarning,
            stacklevel=3,
        )


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


def _check_k(k: float) -> None:
    if not 0 < k <= 1:
        raise ValueError(f"k is a fraction in (0, 1], got {k}")


def min_k_score(stats: TokenStats, k: float = 0.4, score_eos: bool = False) -> float:
    """Min-K% Prob (Shi et al. 2024, arXiv:2310.16789): the mean of the lowest `max(1, int(n * k))` of the n token
    log-probs. The closing EOS is left out by default, as open-unlearning's ``MinKProbAttack`` does; on text rows
    every token after the BOS is scored, as MUSE's PrivLeak does."""
    _check_k(k)
    logprobs = stats.scored(score_eos).logprobs
    n = max(1, int(len(logprobs) * k))
    return torch.topk(logprobs, n, largest=False).values.mean().item()


def min_k_plus_plus_score(stats: TokenStats, k: float = 0.4, score_eos: bool = False) -> float:
    """Min-K%++ (Zhang et al. 2024, arXiv:2404.02936): token scores (log p(y_t) - mu_t) / sigma_t, mu_t and sigma_t
    the mean and standard deviation of log p(z) for z drawn from the model's own next-token distribution; the mean
    of the lowest `max(1, int(n * k))`. As open-unlearning's ``MinKPlusPlusAttack``: the closing EOS left out by
    default, sigma_t = sqrt(max(sigma_t^2, 1e-6)) (the paper's code has no floor; it only matters where the model
    is near-certain)."""
    _check_k(k)
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
) -> list[float]:
    """GradNorm attack (Wang et al. 2024, arXiv:2402.17012; as implemented in MIMIR and open-unlearning): minus the
    size of the gradient of the example's mean token NLL with respect to the model's parameters. Members sit near a
    minimum of the loss, so their gradients are smaller.

    `reduction="mean"` (default, the reference): the mean over parameter tensors of each tensor's p-norm,
    `-mean_theta ||d NLL / d theta||_p`, as MIMIR's and open-unlearning's ``GradNormAttack`` compute it (p = 2 in
    open-unlearning's configs). `reduction="global"`: the p-norm of the whole gradient, `-||d NLL / d params||_p`,
    the textbook gradient norm (not tied to how the parameters are split into tensors; the ranking can differ). The
    NLL leaves the closing EOS out by default (open-unlearning's ``tokenwise_logprobs``).

    One forward and one backward per example (padding stripped from each collated row); the batches are split across
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
    per_batch = map_sharded(lambda block: _gradnorm_block(model, block, desc, score_eos, reduction, p), list(batches))
    return [score for batch in per_batch for score in batch]


def _gradnorm_block(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    desc: str | None,
    score_eos: bool,
    reduction: str,
    norm_ord: float,
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
                    if not score_eos and "closing_eos" in batch and bool(batch["closing_eos"][b]):
                        mask[mask.nonzero()[-1, 0]] = False  # the closing EOS, the last labelled position
                        if not mask.any():
                            raise ValueError(
                                "An example has no scored token once its closing EOS is left out (an empty "
                                "answer); drop the row or pass score_eos=True."
                            )
                    nll = F.cross_entropy(logits[mask], targets[mask])
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


class MIAEvaluator:
    """Membership-inference AUCs of telling `members` (the forget set) from `nonmembers` (a holdout never trained
    on), one per attack in `attacks` (names in `ATTACKS`; by default all of them, "reference" only with `ref_model`).

    Rows are QA (`question`/`answer`: the answer is scored given the question) or plain text (`text`). One
    `token_stats` pass per set serves loss, zlib, min_k, min_k_plus_plus and reference (the reference model
    `ref_model`, scored with the same tokenizer, gets its own pass); gradnorm runs one backward per example. The ZLib
    text is the scored tokens decoded without special tokens (open-unlearning's), i.e. `" " + answer` with the
    package's byte-level tokenizers, the text itself for a text row. Summary: `{name}/{attack}_auc`; per example:
    `{name}/{attack}_members`, `{name}/{attack}_nonmembers` (the scores, higher = member); `intervals`: the 95%
    confidence interval of every AUC (`auc_interval`); `rows`: `{name}/members`, `{name}/nonmembers` (counts and
    fingerprints of the scored columns). An empty side is refused; fewer than `MIN_ROWS_PER_SIDE` rows a side warn.

    Args:
        k: the Min-K% / Min-K%++ fraction (open-unlearning's TOFU and MUSE configs: 0.4).
        score_eos: None (default) scores the closing EOS of a QA row where open-unlearning's attack does (loss,
            zlib, reference; see `EOS_SCORED`) and leaves it out elsewhere (min_k, min_k_plus_plus, gradnorm);
            True or False forces one choice for every attack.
        gradnorm_reduction / gradnorm_p: `gradnorm_scores`' `reduction` and `p` (default: the reference's mean of
            the per-tensor 2-norms).
        bootstrap_resamples / bootstrap_seed: the bootstrap of the AUC intervals (`auc_interval`: 1000, seed 0).
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
        score_eos: bool | None = None,
        gradnorm_reduction: Literal["mean", "global"] = "mean",
        gradnorm_p: float = 2.0,
        bootstrap_resamples: int = BOOTSTRAP_RESAMPLES,
        bootstrap_seed: int = 0,
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
        if gradnorm_reduction not in GRADNORM_REDUCTIONS:
            raise ValueError(
                f"gradnorm_reduction must be one of {list(GRADNORM_REDUCTIONS)}, got {gradnorm_reduction!r}"
            )
        if gradnorm_p not in (1, 2, math.inf):
            raise ValueError(f"gradnorm_p must be 1, 2 or math.inf, got {gradnorm_p}")
        if score_eos is not None and not isinstance(score_eos, bool):
            raise TypeError(f"score_eos must be None, True or False, got {score_eos!r}")
        if bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {bootstrap_resamples}")
        sides = (
            (members, "members", "`members`: the forget set"),
            (nonmembers, "non-members", "`nonmembers`: the holdout, `holdout=` of MetricSuite.run"),
        )
        for dataset, side, origin in sides:
            if len(dataset) == 0:
                raise ValueError(
                    f"Membership inference: the {side} dataset is empty ({origin}); an AUC needs rows on both sides."
                )
            row_format(dataset, f"The {side} dataset")
        self.members = members
        self.nonmembers = nonmembers
        self.attacks = attacks
        self.k = k
        self.ref_model = ref_model
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = name
        self.score_eos = score_eos
        self.gradnorm_reduction = gradnorm_reduction
        self.gradnorm_p = gradnorm_p
        self.bootstrap_resamples = bootstrap_resamples
        self.bootstrap_seed = bootstrap_seed

    def rows(self) -> dict[str, dict]:
        """``{"{name}/members": ..., "{name}/nonmembers": ...}``: `describe_rows` over the columns scored."""
        out = {}
        for side, dataset in (("members", self.members), ("nonmembers", self.nonmembers)):
            columns = ("question", "answer") if row_format(dataset, f"The {side} set") == "qa" else ("text",)
            out[f"{self.name}/{side}"] = describe_rows(dataset, columns, f"MIA {side} set")
        return out

    def eos_scored(self, attack: str) -> bool:
        """Whether `attack` scores the closing EOS of a QA row here (`score_eos`, else the reference's choice)."""
        return EOS_SCORED[attack] if self.score_eos is None else self.score_eos

    def _batches(self, dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Iterator[dict[str, torch.Tensor]]:
        return dataset_batches(dataset, tokenizer, self.batch_size, self.max_length)

    def _scores(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, which: str
    ) -> dict[str, list[float]]:
        desc = f"{self.name}: {which}"
        stats = token_stats(model, self._batches(dataset, tokenizer), desc=desc)
        scores: dict[str, list[float]] = {}
        for attack in self.attacks:
            eos = self.eos_scored(attack)
            if attack == "loss":
                scores[attack] = [loss_score(s, eos) for s in stats]
            elif attack == "zlib":
                texts = [tokenizer.decode(s.targets.tolist(), skip_special_tokens=True) for s in stats]
                scores[attack] = [zlib_score(s, t, eos) for s, t in zip(stats, texts, strict=True)]
            elif attack == "min_k":
                scores[attack] = [min_k_score(s, self.k, eos) for s in stats]
            elif attack == "min_k_plus_plus":
                scores[attack] = [min_k_plus_plus_score(s, self.k, eos) for s in stats]
            elif attack == "gradnorm":
                batches = self._batches(dataset, tokenizer)
                scores[attack] = gradnorm_scores(
                    model,
                    batches,
                    desc=f"{desc} gradnorm",
                    score_eos=eos,
                    reduction=self.gradnorm_reduction,
                    p=self.gradnorm_p,
                )
            elif attack == "reference":
                batches = self._batches(dataset, tokenizer)
                ref = token_stats(self.ref_model, batches, desc=f"{desc} reference model")
                scores[attack] = [reference_score(s, r, eos) for s, r in zip(stats, ref, strict=True)]
        return scores

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """AUC, its confidence interval and per-example scores of every attack. `reference` is unused (kept for the
        evaluator interface)."""
        warn_few_rows({"member": len(self.members), "non-member": len(self.nonmembers)}, "Membership inference")
        rows = self.rows()
        members = self._scores(model, tokenizer, self.members, "members")
        nonmembers = self._scores(model, tokenizer, self.nonmembers, "non-members")
        meta = {
            "attacks": list(self.attacks),
            "k": self.k,
            "eos_scored": {a: self.eos_scored(a) for a in self.attacks},
            "num_members": len(self.members),
            "num_nonmembers": len(self.nonmembers),
            "rows": row_format(self.members, "The members dataset"),
            "scores": "higher = member; AUC 0.5 = members indistinguishable from non-members",
        }
        if "gradnorm" in self.attacks:
            meta["gradnorm"] = {"reduction": self.gradnorm_reduction, "p": self.gradnorm_p}
        result = EvaluationResult(meta={self.name: meta}, rows=rows)
        for attack in self.attacks:
            key = f"{self.name}/{attack}_auc"
            result.summary[key] = auc(members[attack], nonmembers[attack])
            resamples, seed = self.bootstrap_resamples, self.bootstrap_seed
            low, high = auc_interval(members[attack], nonmembers[attack], resamples, seed)
            result.intervals[key] = interval_entry(low, high, resamples, seed)
            result.per_example[f"{self.name}/{attack}_members"] = members[attack]
            result.per_example[f"{self.name}/{attack}_nonmembers"] = nonmembers[attack]
        return result
