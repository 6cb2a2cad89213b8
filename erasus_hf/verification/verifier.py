"""`UnlearningVerifier`: is the forget set's trace gone, as far as tests can tell? A set of statistical checks, each
with its statistic, its p-value or interval, its significance level and its own verdict; never one PASS.

The nulls. Members are the forget rows. They are compared with non-members, rows the model never trained on (the
holdout: for TOFU, rows of authors never trained on), and, when given, with a retrained model (trained without the
forget rows: the retain model), either the model itself or its evaluation JSON (`erasus-hf evaluate --benchmark mia`
on the same forget and holdout rows). Never with the retain set: retain rows are training members too, so a model
that kept everything would look the same on both.

The checks (each in `VerificationResult.checks`, named as below; `{attack}` is a MIA score of `evaluation.attacks`):

- ``mia_auc/{attack}``: the population MIA (`evaluation.mia.MIAEvaluator`) forget vs holdout, ROC AUC with its
  (1 - alpha) bootstrap interval (`evaluation.auc.auc_interval`); distinguishable when the interval excludes 0.5.
  The TPR at low FPR (1%, 0.1%; `fprs`) and its bootstrap interval are in its details.
- ``mia_auc_vs_retrained/{attack}``: the audited model's AUC minus the retrained model's AUC on the same rows
  (a paired bootstrap: a row's two scores resampled together); distinguishable from retraining when the interval
  excludes 0. The retrained model's own AUC also says whether the holdout is a valid null for that attack: when a
  model that never saw the forget rows tells them from the holdout, the rows differ in more than membership (other
  authors, lengths), and the ``mia_auc`` check of that attack is marked ``null_valid: false``.
- ``ks/{attack}``, ``mann_whitney/{attack}``: the distribution of the audited model's scores on the forget rows
  against the retrained model's scores on the same rows (with a retrained model), else against the audited model's
  scores on the holdout; two-sided, so over-unlearning (forget rows *less* likely than retraining leaves them, the
  "Streisand effect") counts as distinguishable too.
- ``epsilon/holdout`` (and ``epsilon/retrained``): the empirical epsilon lower bound of the threshold attacks
  (`statistics.epsilon_lower_bound`), thresholds set on one random half of the null rows and rates counted on the
  other half, Clopper-Pearson at confidence 1 - alpha with a union bound over every (attack, threshold) tried.
- ``lira``: the per-example likelihood-ratio audit (`lira`), with reference models (given, or trained by
  `lira.train_reference_models`): the fraction of forget rows still identified at `lira_fpr`, tested against the
  `lira_fpr` a model that never saw them would show (binomial).
- ``relearning``: with a retrained model given as a model, the relearning curves of both (`relearning`).

What a verdict means: "indistinguishable from non-members / from retraining at level alpha" says the test found no
evidence at that level, with these rows and this attack; it is evidence, not proof (a stronger attack, more rows or
other rows may tell them apart; Zhang et al. 2024, ICML, show that a dishonest provider can fool MIA-based
verification). Each check is a test at level alpha by itself; `VerificationResult.meta["family"]` also gives Holm's
correction over the checks that have a p-value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.formats import TextFormat
from ..evaluation.auc import auc_interval
from ..evaluation.mia import ATTACKS, MIAEvaluator
from ..evaluation.result import EvaluationResult
from ..evaluation.scoring import evaluation_format, row_format
from . import lira as lira_audit
from .relearning import check_step_grid, compare_curves, relearning_curve, split_rows
from .statistics import (
    ALPHA,
    BOOTSTRAP_METHOD,
    binomial_excess_p_value,
    check_alpha,
    clopper_pearson_lower,
    clopper_pearson_upper,
    epsilon_lower_bound,
    holm,
    interval,
    stratified_bootstrap,
    tpr_at_fpr,
    two_sample_tests,
)

DEFAULT_ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")
"""The population attacks run by default (GradNorm, a backward pass per row, only when asked)."""

VERIFIABLE_ATTACKS = tuple(a for a in ATTACKS if a != "reference")
"""The attacks a check may use: every MIA score but "reference" (the retrained model is the verifier's calibration)."""

MIA_NAME = "mia"
NULL_PHRASES = {"non-members": "non-members", "retraining": "retraining"}

CAVEATS = (
    "Each verdict is a statistical test of the stated null at level alpha: 'indistinguishable' means no evidence was "
    "found with these rows and this attack, not proof that the data's influence is gone.",
    "Approximate unlearning yields evidence, not proof: a dishonest provider can fool MIA-based (and backdoor-based) "
    "verification (Zhang et al., ICML 2024); only retraining without the rows, or a certified method, removes them "
    "by construction.",
    "Rows are treated as independent samples; TOFU rows come in blocks of one author (20 rows), so intervals over few "
    "authors are narrower than the author-level variation.",
    "The holdout must differ from the forget rows only in membership (same source, same kind of text, and a "
    "tokenizer that saw neither more than the other); a retrained model's own forget-vs-holdout AUC tests this.",
)


@dataclass
class Check:
    """One test of the verification: what it tests, against which null, its statistic, its p-value and/or
    interval, the level `alpha`, whether it rejects the null (`rejected`) and the verdict sentence (`verdict`)."""

    name: str
    tests: str
    null: str  # "non-members" or "retraining"
    statistic: str
    value: float | None
    alpha: float
    rejected: bool
    p_value: float | None = None
    interval: dict[str, Any] | None = None
    null_valid: bool = True
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        word = "distinguishable" if self.rejected else "indistinguishable"
        return f"{word} from {NULL_PHRASES[self.null]} at level {self.alpha:g}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        return cls(**{k: v for k, v in data.items() if k != "verdict"})


@dataclass
class VerificationResult:
    """The checks of one verification (`checks`), the checks that could not run and why (`skipped`), and what was
    verified and how (`meta`: rows, alpha, attacks, references, the family-wise summary, the caveats). JSON-
    serialisable (`to_dict`, `save`, `load`); `describe()` is the markdown of the card."""

    checks: list[Check] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Check:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"No check {name!r}; checks: {[c.name for c in self.checks]}")

    @property
    def rejected(self) -> list[str]:
        """The names of the checks that tell the model from their null."""
        return [c.name for c in self.checks if c.rejected]

    def to_dict(self) -> dict[str, Any]:
        return _json_ready({"checks": [c.to_dict() for c in self.checks], "skipped": self.skipped, "meta": self.meta})

    def save(self, path: str | Path) -> None:
        """Write the JSON (strict JSON: no NaN or infinity; redacted as evaluation JSONs are)."""
        from ..redaction import redact_json

        Path(path).write_text(json.dumps(redact_json(self.to_dict()), indent=2, allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> VerificationResult:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "checks" not in data:
            raise ValueError(f"{path} is not an erasus-hf verification JSON (no 'checks').")
        return cls([Check.from_dict(c) for c in data["checks"]], data.get("skipped", {}), data.get("meta", {}))

    def to_evaluation_result(self, prefix: str = "verify") -> EvaluationResult:
        """The checks as an `EvaluationResult` (what the card's evaluation section and `model-index` read): summary
        ``{prefix}/{check}`` = its statistic, its interval in `intervals`, its p-value as ``{prefix}/{check}_p_value``,
        and the whole verification in ``meta[prefix]``."""
        result = EvaluationResult(meta={prefix: self.to_dict()})
        for check in self.checks:
            if check.value is None or not math.isfinite(check.value):
                continue
            key = f"{prefix}/{check.name}"
            result.summary[key] = check.value
            if check.p_value is not None:
                result.summary[f"{key}_p_value"] = check.p_value
            if check.interval is not None and check.interval.get("high") is not None:
                result.intervals[key] = check.interval
        return result

    def describe(self) -> str:
        """Markdown: what was compared, one table row per check (what it tests, statistic, interval or p-value,
        verdict), the family-wise count, the checks skipped, and the caveats."""
        meta = self.meta
        lines = ["### Unlearning verification", ""]
        nulls = f"{meta.get('holdout_rows', '?')} holdout rows never trained on"
        if meta.get("retrained"):
            nulls += f" and a retrained model ({meta['retrained']})"
        lines.append(
            f"Members: the {meta.get('forget_rows', '?')} forget rows. Nulls: {nulls}. Every verdict is a test at "
            f"level {meta.get('alpha', '?')}; 'indistinguishable' means no evidence at that level, not proof."
        )
        lines += ["", "| Check | What it tests | Statistic | Interval / p-value | Verdict |", "|---|---|---|---|---|"]
        for check in self.checks:
            value = "n/a" if check.value is None else f"{check.statistic} = {check.value:.4g}"
            where = []
            if check.interval is not None:
                high = check.interval.get("high")
                high_text = "inf" if high is None else f"{high:.4g}"
                where.append(f"[{check.interval['low']:.4g}, {high_text}] ({check.interval['level']:.0%})")
            if check.p_value is not None:
                where.append(f"p = {check.p_value:.3g}")
            verdict = check.verdict + ("" if check.null_valid else " (null not valid for this attack, see notes)")
            lines.append(f"| `{check.name}` | {check.tests} | {value} | {'; '.join(where) or 'n/a'} | {verdict} |")
        family = meta.get("family")
        if family:
            lines += ["", family["statement"]]
        if self.skipped:
            lines += ["", "Not run: " + "; ".join(f"`{k}` ({v})" for k, v in self.skipped.items()) + "."]
        notes = [f"`{c.name}`: {n}" for c in self.checks for n in c.notes]
        if notes:
            lines += ["", "Notes:", *(f"- {n}" for n in notes)]
        lines += ["", "What this does and does not show:", *(f"- {c}" for c in meta.get("caveats", CAVEATS))]
        return "\n".join(lines) + "\n"


def _json_ready(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python numbers and lists, and non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def pair_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """The AUC of two score samples by its definition: the fraction of (member, non-member) pairs where the member
    scores higher, ties counting one half (what `evaluation.auc.auc` computes, vectorised for the bootstrap)."""
    diff = np.asarray(members, dtype=float)[:, None] - np.asarray(nonmembers, dtype=float)[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@dataclass(eq=False)
class UnlearningVerifier:
    """Statistical verification of unlearning the `forget` rows (members) against the `holdout` rows (never trained
    on) and, at `verify` time, a retrained model (module doc for the checks).

    Args:
        forget / holdout: question/answer or text rows (as `MIAEvaluator` reads them); no row in both.
        alpha: the significance level of every check (and 1 - alpha the level of every interval).
        attacks: the MIA scores of the population checks (`VERIFIABLE_ATTACKS`; default `DEFAULT_ATTACKS`).
        fprs: the low false-positive rates at which the TPR is reported (1%, 0.1%).
        references: the reference models of the likelihood-ratio audit (`lira.ReferenceModel`: a model or its
            evaluation, and which forget rows it trained on); none: the audit is skipped. `lira.train_reference_models`
            trains them for small models.
        lira_attack / lira_fpr / lira_fixed_variance: the audit's per-row score, the FPR a row is "identified" at,
            and whether the variances are pooled over rows (None: below `lira.FIXED_VARIANCE_BELOW` references).
        epsilon_delta / epsilon_fprs: the delta of the epsilon bound, and the calibration FPRs of its thresholds
            (0 = above every calibration row).
        relearn_steps / relearn_fraction / relearn_learning_rate / relearn_batch_size: the relearning test (with a
            retrained model given as a model): the step grid, the share of the forget rows fine-tuned on (the rest
            measured), the AdamW learning rate and batch size; an empty grid skips it. relearn_target_accuracy
            (e.g. the forget accuracy before unlearning): also report the steps each model needs to reach it.
        bootstrap_resamples / seed: every bootstrap and every random split.
        batch_size / max_length / text_format: how rows are scored (as `MIAEvaluator`; the run's `TextFormat`).
    """

    forget: Dataset
    holdout: Dataset
    alpha: float = ALPHA
    attacks: Sequence[str] = DEFAULT_ATTACKS
    fprs: Sequence[float] = (0.01, 0.001)
    references: Sequence[lira_audit.ReferenceModel] = ()
    lira_attack: str = "loss"
    lira_fpr: float = 0.05
    lira_fixed_variance: bool | None = None
    epsilon_delta: float = 0.0
    epsilon_fprs: Sequence[float] = (0.0, 0.05, 0.1, 0.25)
    relearn_steps: Sequence[int] = (4, 8, 16)
    relearn_fraction: float = 0.5
    relearn_learning_rate: float = 1e-4
    relearn_batch_size: int = 4
    relearn_target_accuracy: float | None = None
    bootstrap_resamples: int = 1000
    seed: int = 0
    batch_size: int = 32
    max_length: int = 512
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        self.attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(self.attacks)
        for attack in (*self.attacks, self.lira_attack):
            if attack not in VERIFIABLE_ATTACKS:
                raise ValueError(
                    f"Unknown or unusable attack {attack!r} for verification; choose from {list(VERIFIABLE_ATTACKS)} "
                    "('reference' is left out: the retrained model passed to verify() is the calibration)."
                )
        if not self.attacks:
            raise ValueError(f"attacks is empty; choose from {list(VERIFIABLE_ATTACKS)}.")
        for rate in (*self.fprs, self.lira_fpr):
            if not 0 < rate < 1:
                raise ValueError(f"False-positive rates (fprs, lira_fpr) lie in (0, 1), got {rate!r}.")
        if any(not 0 <= rate < 1 for rate in self.epsilon_fprs) or not self.epsilon_fprs:
            raise ValueError(f"epsilon_fprs are calibration FPRs in [0, 1), got {list(self.epsilon_fprs)!r}.")
        if self.bootstrap_resamples < 1:
            raise ValueError(f"bootstrap_resamples must be >= 1, got {self.bootstrap_resamples}")
        if self.relearn_steps:
            self.relearn_steps = check_step_grid(self.relearn_steps)
            if not 0 < self.relearn_fraction < 1:
                raise ValueError(f"relearn_fraction must be in (0, 1), got {self.relearn_fraction}")
        self.text_format = evaluation_format(self.text_format)
        self._check_rows()
        self.references = list(self.references)
        self._membership = self._check_references()

    # ---- input checks, before any forward pass ----

    def _check_rows(self) -> None:
        formats = {}
        for rows, side, option in ((self.forget, "forget", "forget="), (self.holdout, "holdout", "holdout=")):
            if len(rows) == 0:
                raise ValueError(f"The {side} rows ({option}) are empty; the verification needs rows on both sides.")
            formats[side] = row_format(rows, f"The {side} rows ({option})")
            if len(rows) < 2:
                raise ValueError(
                    f"The {side} rows ({option}) hold {len(rows)} row; the verification needs at least 2 a side (its "
                    "epsilon bound sets thresholds on half of them and counts on the other half)."
                )
        if formats["forget"] != formats["holdout"]:
            raise ValueError(
                f"The forget rows are {formats['forget']} rows and the holdout rows {formats['holdout']} rows; give "
                "both in one format (question/answer, or text) so their scores are comparable."
            )
        key = ("question", "answer") if formats["forget"] == "qa" else ("text",)
        seen = {tuple(r[c] for c in key) for r in self.forget.select_columns(list(key))}
        shared = [i for i, r in enumerate(self.holdout.select_columns(list(key))) if tuple(r[c] for c in key) in seen]
        if shared:
            raise ValueError(
                f"Holdout rows {shared[:5]} are also forget rows: the holdout must be rows never trained on. Remove "
                "them from the holdout."
            )
        self._row_format = formats["forget"]

    def _check_references(self) -> np.ndarray | None:
        if not self.references:
            return None
        membership = np.stack([ref.membership(len(self.forget)) for ref in self.references])
        out_count = (~membership).sum(0)
        if out_count.min() < 2:
            rows = np.flatnonzero(out_count < 2).tolist()
            raise ValueError(
                f"The likelihood-ratio audit needs at least two OUT references (never trained on the row) for every "
                f"forget row; forget rows {rows[:5]} have only {int(out_count.min())} of {len(self.references)}. "
                "Add references trained without them (e.g. more retain-only models)."
            )
        return membership

    def _mia(self, attacks: Sequence[str]) -> MIAEvaluator:
        return MIAEvaluator(
            self.forget,
            self.holdout,
            attacks=tuple(dict.fromkeys(attacks)),
            batch_size=self.batch_size,
            max_length=self.max_length,
            name=MIA_NAME,
            bootstrap_resamples=self.bootstrap_resamples,
            bootstrap_seed=self.seed,
            text_format=self.text_format,
        )

    def check_evaluation(self, result: EvaluationResult, attacks: Sequence[str], what: str) -> EvaluationResult:
        """Refuse, before any forward pass, an evaluation (of the retrained model, the control or a reference) of
        other rows or without the per-example scores of `attacks`; returns it."""
        result.check_same_rows(self._mia(attacks).rows(), [f"{MIA_NAME}/members", f"{MIA_NAME}/nonmembers"], what)
        missing = [
            f"{MIA_NAME}/{a}_{side}"
            for a in attacks
            for side in ("members", "nonmembers")
            if f"{MIA_NAME}/{a}_{side}" not in result.per_example
        ]
        if missing:
            raise ValueError(
                f"{what}: the evaluation{f' {result.source}' if result.source else ''} lacks the per-example scores "
                f"{missing[:4]}; evaluate that model with `erasus-hf evaluate --benchmark mia` on the same forget and "
                f"holdout rows (attacks {list(attacks)})."
            )
        return result

    # ---- the verification ----

    def verify(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        retrained: nn.Module | EvaluationResult | str | Path | None = None,
        control: nn.Module | EvaluationResult | None = None,
    ) -> VerificationResult:
        """Run every check on `model` (scored with `tokenizer`).

        `retrained`: a model trained without the forget rows (the retain model), or its evaluation (an
        `EvaluationResult` or the path of its JSON, with the MIA scores of the same rows). `control`: a second model
        trained without the forget rows, independently of `retrained` (another seed); by default the first reference
        that trained on no forget row and is neither `model` nor `retrained`. Every check against retraining is run
        for the control too: where the control is distinguishable from the retrained model as well, training
        randomness alone rejects that check, and it is marked ``null_valid: false``. A retrained evaluation of other
        rows, or references that cannot serve the audit, are refused before any forward pass."""
        retrained = self._load_evaluation(retrained, "retrained")
        retrained_model = retrained if isinstance(retrained, nn.Module) else None
        retrained_eval = None
        if isinstance(retrained, EvaluationResult):
            retrained_eval = self.check_evaluation(retrained, self.attacks, "The retrained model's evaluation")
        elif retrained is not None and retrained_model is None:
            raise TypeError(f"retrained must be a model, an EvaluationResult or a JSON path, got {type(retrained)}.")
        for ref in self.references:
            if isinstance(ref.source, EvaluationResult):
                self.check_evaluation(ref.source, (self.lira_attack,), f"Reference {ref.name!r}")
        control = self._control(control, model, retrained)
        if isinstance(control, EvaluationResult):
            self.check_evaluation(control, self.attacks, "The control model's evaluation")

        mia = self._mia((*self.attacks, self.lira_attack))
        target = mia.evaluate(model, tokenizer)
        if retrained_model is not None:
            retrained_eval = self._mia(self.attacks).evaluate(retrained_model, tokenizer)
        control_eval = control
        if isinstance(control, nn.Module) and retrained_eval is not None:
            control_eval = self._mia(self.attacks).evaluate(control, tokenizer)
        result = VerificationResult(meta=self._meta(retrained, control, mia))
        valid_holdout = []
        for attack in self.attacks:
            checks = self._population_checks(attack, target, retrained_eval)
            if control_eval is not None and retrained_eval is not None:
                self._apply_control(checks, self._population_checks(attack, control_eval, retrained_eval, tpr=False))
            valid_holdout += [attack] if checks[0].null_valid else []
            result.checks += checks
        if valid_holdout:
            result.checks.append(self._epsilon_check("holdout", target, None, valid_holdout))
        else:
            result.skipped["epsilon/holdout"] = (
                "the retrained model tells the forget rows from the holdout by every attack"
            )
        if retrained_eval is not None:
            check = self._epsilon_check("retrained", target, retrained_eval, self.attacks)
            if control_eval is not None:
                self._apply_control(
                    [check], [self._epsilon_check("retrained", control_eval, retrained_eval, self.attacks)]
                )
            result.checks.append(check)
        if self.references:
            result.checks.append(self._lira_check(target, tokenizer))
        else:
            result.skipped["lira"] = "no reference models (references=...; lira.train_reference_models trains them)"
        self._relearning(
            result, model, tokenizer, retrained_model, control if isinstance(control, nn.Module) else None
        )
        result.meta["family"] = self._family(result.checks)
        return result

    @staticmethod
    def _load_evaluation(value: Any, what: str) -> Any:
        """An evaluation JSON path loaded; anything else as it is."""
        if not isinstance(value, (str, Path)):
            return value
        if not Path(value).is_file():
            raise ValueError(
                f"{what}={str(value)!r} is no evaluation JSON file; pass the model itself (load a folder with "
                "erasus_hf.modeling.loading.load_model) or the JSON `erasus-hf evaluate --benchmark mia` wrote for it."
            )
        return EvaluationResult.load(value)

    def _control(self, control: Any, model: nn.Module, retrained: Any) -> nn.Module | EvaluationResult | None:
        if control is not None:
            if not isinstance(control, (nn.Module, EvaluationResult)):
                raise TypeError(f"control must be a model or an EvaluationResult, got {type(control).__name__}.")
            return control
        if retrained is None:
            return None
        for ref, flags in zip(self.references, self._membership if self._membership is not None else [], strict=False):
            if not flags.any() and ref.source is not model and ref.source is not retrained:
                return ref.source
        return None

    @staticmethod
    def _apply_control(checks: list[Check], control_checks: list[Check]) -> None:
        """Mark each check whose twin on the control model (same test, control against the retrained model) rejects
        too: training randomness alone rejects it."""
        by_name = {c.name: c for c in control_checks}
        for check in checks:
            twin = by_name.get(check.name)
            if twin is None or check.null != "retraining":
                continue
            check.details["control"] = {
                "value": twin.value,
                "p_value": twin.p_value,
                "interval": twin.interval,
                "rejected": twin.rejected,
            }
            if twin.rejected:
                check.null_valid = False
                check.notes.append(
                    "an independently retrained model (the control) is distinguishable from the retrained model by "
                    f"this test too ({twin.statistic} = {twin.value:.3g}): training randomness alone rejects it, so "
                    "it compares with this one retrained model, not with retraining"
                )

    def _meta(self, retrained: Any, control: Any, mia: MIAEvaluator) -> dict[str, Any]:
        def described(value: Any) -> str | None:
            if isinstance(value, nn.Module):
                return type(value).__name__
            if isinstance(value, EvaluationResult):
                return f"its evaluation{f' {value.source}' if value.source else ''}"
            return None

        return {
            "alpha": self.alpha,
            "attacks": list(self.attacks),
            "forget_rows": len(self.forget),
            "holdout_rows": len(self.holdout),
            "row_format": self._row_format,
            "retrained": described(retrained),
            "control": described(control),
            "references": len(self.references),
            "bootstrap": {"resamples": self.bootstrap_resamples, "seed": self.seed, "method": BOOTSTRAP_METHOD},
            "rows": mia.rows(),
            "caveats": list(CAVEATS),
        }

    def _scores(self, result: EvaluationResult, attack: str, centred: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The (forget, holdout) scores of `attack` in `result`; `centred`: both minus the median holdout score, so
        that scores of different models compare row by row without a model-level shift (a model that is less sure
        of every text is not thereby less of a member)."""
        members = np.asarray(result.per_example[f"{MIA_NAME}/{attack}_members"], dtype=float)
        nonmembers = np.asarray(result.per_example[f"{MIA_NAME}/{attack}_nonmembers"], dtype=float)
        if centred:
            shift = float(np.median(nonmembers))
            return members - shift, nonmembers - shift
        return members, nonmembers

    def _population_checks(
        self, attack: str, target: EvaluationResult, retrained: EvaluationResult | None, tpr: bool = True
    ) -> list[Check]:
        members, nonmembers = self._scores(target, attack)
        level, boot = 1 - self.alpha, dict(resamples=self.bootstrap_resamples, seed=self.seed)
        low, high = auc_interval(members, nonmembers, level=level, **boot)
        value = pair_auc(members, nonmembers)
        auc_check = Check(
            name=f"mia_auc/{attack}",
            tests=f"whether the {attack} score tells the forget rows from the holdout rows (never trained on) better "
            "than chance (ROC AUC; 0.5 = chance)",
            null="non-members",
            statistic="AUC",
            value=value,
            alpha=self.alpha,
            rejected=not low <= 0.5 <= high,
            interval=interval(
                low, high, level, "percentile bootstrap (scipy), members and non-members resampled separately", **boot
            ),
            details={"tpr_at_fpr": [self._tpr(members, nonmembers, fpr) for fpr in self.fprs] if tpr else []},
        )
        auc_check.notes += [
            f"FPR {d['target_fpr']:g} is below the resolution 1/{len(nonmembers)} of the holdout: the TPR given is "
            "the TPR at FPR 0 (forget rows above every holdout row)"
            for d in auc_check.details["tpr_at_fpr"]
            if d["target_fpr"] < d["resolution"]
        ]
        checks = [auc_check]
        if retrained is not None:
            r_members, r_nonmembers = self._scores(retrained, attack)
            checks.append(self._auc_difference(attack, members, nonmembers, r_members, r_nonmembers))
            r_low, r_high = auc_interval(r_members, r_nonmembers, level=level, **boot)
            auc_check.details["retrained_auc"] = {
                "value": pair_auc(r_members, r_nonmembers),
                "low": r_low,
                "high": r_high,
            }
            if not r_low <= 0.5 <= r_high:
                auc_check.null_valid = False
                auc_check.notes.append(
                    f"the retrained model itself tells these forget rows from the holdout (AUC "
                    f"{pair_auc(r_members, r_nonmembers):.3f} [{r_low:.3f}, {r_high:.3f}]): the holdout is not a "
                    f"valid null for {attack} (the rows differ in more than membership); read "
                    f"`mia_auc_vs_retrained/{attack}`"
                )
            centred, _ = self._scores(target, attack, centred=True)
            r_centred, _ = self._scores(retrained, attack, centred=True)
            checks += self._distribution_checks(attack, centred, r_centred, "retraining")
        else:
            checks += self._distribution_checks(attack, members, nonmembers, "non-members")
        return checks

    def _tpr(self, members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> dict[str, Any]:
        point = tpr_at_fpr(members, nonmembers, fpr)
        low, high = stratified_bootstrap(
            lambda m, h: tpr_at_fpr(m, h, fpr)["tpr"],
            (members, nonmembers),
            self.bootstrap_resamples,
            self.seed,
            1 - self.alpha,
        )
        return {**point, "interval": interval(low, high, 1 - self.alpha, BOOTSTRAP_METHOD)}

    def _auc_difference(
        self, attack: str, members: np.ndarray, nonmembers: np.ndarray, r_members: np.ndarray, r_nonmembers: np.ndarray
    ) -> Check:
        forget_pairs = np.stack([members, r_members], axis=1)
        holdout_pairs = np.stack([nonmembers, r_nonmembers], axis=1)

        def difference(f: np.ndarray, h: np.ndarray) -> float:
            return pair_auc(f[:, 0], h[:, 0]) - pair_auc(f[:, 1], h[:, 1])

        level = 1 - self.alpha
        low, high = stratified_bootstrap(
            difference, (forget_pairs, holdout_pairs), self.bootstrap_resamples, self.seed, level
        )
        return Check(
            name=f"mia_auc_vs_retrained/{attack}",
            tests=f"whether the {attack} AUC (forget vs holdout) differs from the retrained model's AUC on the same "
            "rows (the row-level confounds cancel)",
            null="retraining",
            statistic="AUC - retrained AUC",
            value=difference(forget_pairs, holdout_pairs),
            alpha=self.alpha,
            rejected=not low <= 0.0 <= high,
            interval=interval(low, high, level, "paired " + BOOTSTRAP_METHOD),
        )

    def _distribution_checks(self, attack: str, members: np.ndarray, other: np.ndarray, null: str) -> list[Check]:
        tests = two_sample_tests(members, other)
        against = (
            "the retrained model's scores on the same forget rows"
            if null == "retraining"
            else "the model's scores on the holdout rows"
        )
        ks, mw = tests["ks"], tests["mann_whitney"]
        return [
            Check(
                name=f"ks/{attack}",
                tests=f"whether the model's {attack} scores on the forget rows are distributed as {against} "
                "(two-sample Kolmogorov-Smirnov, two-sided)",
                null=null,
                statistic="KS D",
                value=ks["statistic"],
                alpha=self.alpha,
                rejected=ks["p_value"] < self.alpha,
                p_value=ks["p_value"],
            ),
            Check(
                name=f"mann_whitney/{attack}",
                tests=f"whether the model's {attack} scores on the forget rows sit above or below {against} "
                "(Mann-Whitney U, two-sided)",
                null=null,
                statistic="P(forget score > other)",
                value=mw["auc"],
                alpha=self.alpha,
                rejected=mw["p_value"] < self.alpha,
                p_value=mw["p_value"],
                details={"U": mw["statistic"]},
            ),
        ]

    def _epsilon_check(
        self, null: str, target: EvaluationResult, retrained: EvaluationResult | None, attacks: Sequence[str]
    ) -> Check:
        """The best epsilon lower bound over every (attack, calibration FPR), thresholds set on a random half of the
        null rows and the rates counted on rows the thresholds never saw."""
        candidates = []
        comparisons = len(attacks) * len(self.epsilon_fprs)
        for attack in attacks:
            members, nonmembers = self._scores(target, attack, centred=retrained is not None)
            if retrained is None:  # members: every forget row; nulls: the holdout, split in two (one split for all)
                order = np.random.default_rng(self.seed).permutation(len(nonmembers))
                calibration, counted = nonmembers[order[: len(order) // 2]], nonmembers[order[len(order) // 2 :]]
                flagged = members
            else:  # the same forget rows under both models, split in two
                r_members, _ = self._scores(retrained, attack, centred=True)
                order = np.random.default_rng(self.seed).permutation(len(members))
                half, rest = order[: len(order) // 2], order[len(order) // 2 :]
                calibration, counted, flagged = r_members[half], r_members[rest], members[rest]
            if len(calibration) == 0 or len(counted) == 0:
                raise ValueError(
                    "The epsilon bound needs at least two null rows (half set the thresholds, half count false "
                    "positives); give more holdout rows."
                )
            for level in self.epsilon_fprs:
                threshold = tpr_at_fpr(flagged, calibration, level)["threshold"]
                bound = epsilon_lower_bound(
                    int((flagged > threshold).sum()),
                    len(flagged),
                    int((counted > threshold).sum()),
                    len(counted),
                    delta=self.epsilon_delta,
                    alpha=self.alpha,
                    comparisons=comparisons,
                )
                candidates.append({"attack": attack, "calibration_fpr": level, "threshold": threshold, **bound})
        best = max(candidates, key=lambda c: c["epsilon_lower"])
        phrase = "the holdout rows" if retrained is None else "the retrained model on the same forget rows"
        return Check(
            name=f"epsilon/{null}",
            tests=f"the privacy loss the best threshold attack proves, forget rows under the model against {phrase} "
            f"(epsilon lower bound, delta = {self.epsilon_delta:g}; comparable with a DP epsilon)",
            null="non-members" if retrained is None else "retraining",
            statistic="epsilon lower bound",
            value=best["epsilon_lower"],
            alpha=self.alpha,
            rejected=best["epsilon_lower"] > 0,
            interval=interval(
                best["epsilon_lower"],
                None,
                1 - self.alpha,
                "one-sided Clopper-Pearson on TPR and FPR, union bound over every (attack, threshold) tried",
            ),
            details={"best": best, "candidates": candidates},
            notes=[
                "epsilon_point is the bound of the measured rates (None: unbounded, no false positive); the lower "
                "bound accounts for the few rows counted"
            ],
        )

    def _lira_check(self, target: EvaluationResult, tokenizer: PreTrainedTokenizerBase) -> Check:
        scores, holdout_scores = [], []
        mia = self._mia((self.lira_attack,))
        for ref in self.references:
            evaluation = (
                ref.source if isinstance(ref.source, EvaluationResult) else mia.evaluate(ref.source, tokenizer)
            )
            members, nonmembers = self._scores(evaluation, self.lira_attack, centred=True)
            scores.append(members)
            holdout_scores.append(nonmembers)
        fits = lira_audit.fit_gaussians(np.stack(scores), self._membership, self.lira_fixed_variance)
        members, nonmembers = self._scores(target, self.lira_attack, centred=True)
        rows = lira_audit.audit(members, fits, self.lira_fpr)
        count, n = rows["identified_count"], len(members)
        # calibration: the holdout rows are OUT for every reference and for the model; the offline test's FPR there
        holdout_fits = lira_audit.fit_gaussians(
            np.stack(holdout_scores),
            np.zeros((len(self.references), len(nonmembers)), dtype=bool),
            fits.fixed_variance,
        )
        holdout_p = [
            lira_audit.offline_p_value(s, m, sd)
            for s, m, sd in zip(nonmembers, holdout_fits.out_mean, holdout_fits.out_std, strict=True)
        ]
        holdout_flagged = int(sum(p <= self.lira_fpr for p in holdout_p))
        calibration_p = binomial_excess_p_value(holdout_flagged, len(nonmembers), self.lira_fpr)
        notes = list(fits.notes)
        if calibration_p < self.alpha:
            notes.append(
                f"the offline test flags {holdout_flagged} of {len(nonmembers)} holdout rows at FPR "
                f"{self.lira_fpr:g} (p = {calibration_p:.3g}): the references do not model this model's scores of "
                "unseen rows well (another recipe?), so the per-row p-values overstate the evidence"
            )
        half = self.alpha / 2
        return Check(
            name="lira",
            tests=f"the fraction of forget rows a per-example likelihood-ratio test ({self.lira_attack} score, "
            f"{len(self.references)} references) still identifies as members at FPR {self.lira_fpr:g}, against the "
            f"{self.lira_fpr:g} expected of a model that never saw them (binomial, one-sided)",
            null="retraining",
            statistic=f"fraction identified at FPR {self.lira_fpr:g}",
            value=count / n,
            alpha=self.alpha,
            rejected=binomial_excess_p_value(count, n, self.lira_fpr) < self.alpha,
            p_value=binomial_excess_p_value(count, n, self.lira_fpr),
            interval=interval(
                clopper_pearson_lower(count, n, half),
                clopper_pearson_upper(count, n, half),
                1 - self.alpha,
                "Clopper-Pearson",
            ),
            notes=notes,
            details={
                "identified": count,
                "rows": n,
                "references": [ref.name for ref in self.references],
                "in_count": fits.in_count.tolist(),
                "out_count": fits.out_count.tolist(),
                "fixed_variance": fits.fixed_variance,
                "per_example": {"p_value": rows["p_value"], "log_lr": rows["log_lr"], "test": rows["test"]},
                "holdout_calibration": {
                    "flagged": holdout_flagged,
                    "rows": len(nonmembers),
                    "fpr": holdout_flagged / len(nonmembers),
                    "p_value": calibration_p,
                },
            },
        )

    def _relearning(
        self,
        result: VerificationResult,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        retrained: nn.Module | None,
        control: nn.Module | None,
    ) -> None:
        if not self.relearn_steps:
            result.skipped["relearning"] = "relearn_steps is empty"
            return
        if retrained is None:
            result.skipped["relearning"] = "needs the retrained model itself (retrained=model), not its evaluation"
            return
        if self._row_format != "qa":
            result.skipped["relearning"] = "the relearning attack fine-tunes on question/answer rows"
            return
        rows = split_rows(self.forget.select_columns(["question", "answer"]), self.relearn_fraction, self.seed)
        reference = self._curve(retrained, tokenizer, rows)
        check = self._relearning_check(self._curve(model, tokenizer, rows), reference, rows)
        if control is not None:
            self._apply_control(
                [check], [self._relearning_check(self._curve(control, tokenizer, rows), reference, rows)]
            )
        result.checks.append(check)

    def _curve(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: tuple[Dataset, Dataset]) -> dict:
        options = dict(
            learning_rate=self.relearn_learning_rate,
            batch_size=self.relearn_batch_size,
            seed=self.seed,
            max_length=self.max_length,
            eval_batch_size=self.batch_size,
            text_format=self.text_format,
        )
        return relearning_curve(model, tokenizer, *rows, self.relearn_steps, **options)

    def _relearning_check(self, audited: dict, reference: dict, rows: tuple[Dataset, Dataset]) -> Check:
        relearn, measured = rows
        comparison = compare_curves(audited, reference, self.relearn_target_accuracy)
        notes = []
        if comparison.get("steps_audited") == 0:
            notes.append(f"the model is at the target accuracy {self.relearn_target_accuracy:g} before relearning")
        return Check(
            name="relearning",
            tests=f"whether the forget accuracy of {len(measured)} forget rows, after relearning, exceeds the "
            f"retrained model's when both are fine-tuned on the other {len(relearn)} (accuracy averaged over steps "
            f"{list(self.relearn_steps)}; Wilcoxon signed-rank, one-sided)",
            null="retraining",
            statistic="relearned accuracy - retrained",
            value=comparison["statistic"],
            alpha=self.alpha,
            rejected=comparison["p_value"] < self.alpha,
            p_value=comparison["p_value"],
            notes=notes,
            details={
                **{k: v for k, v in comparison.items() if k not in ("statistic", "p_value")},
                "curve": {"steps": audited["steps"], "accuracy": audited["accuracy"]},
                "retrained_curve": {"steps": reference["steps"], "accuracy": reference["accuracy"]},
                "relearn_rows": len(relearn),
                "measured_rows": len(measured),
                "learning_rate": self.relearn_learning_rate,
            },
        )

    def _family(self, checks: list[Check]) -> dict[str, Any]:
        with_p = [c for c in checks if c.p_value is not None]
        adjusted = holm([c.p_value for c in with_p]) if with_p else []
        holm_rejected = [c.name for c, p in zip(with_p, adjusted, strict=True) if p <= self.alpha]
        individually = [c.name for c in checks if c.rejected]
        statement = (
            f"{len(individually)} of {len(checks)} checks reject their null at level {self.alpha:g} individually; "
            f"of the {len(with_p)} with a p-value, {len(holm_rejected)} still reject after Holm's correction for "
            "testing them together."
        )
        return {
            "rejected": individually,
            "holm_adjusted_p": {c.name: p for c, p in zip(with_p, adjusted, strict=True)},
            "holm_rejected": holm_rejected,
            "statement": statement,
        }
