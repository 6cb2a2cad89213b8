"""One evaluation's numbers: summary metrics and per-example logs, saved as JSON that later runs read back.

The JSON of a retain-model run is the *reference* of forget quality (its per-example forget truth ratios) and of
MUSE's PrivLeak (its MIA AUC): `erasus-hf evaluate ... --reference retain_eval.json`. A reference must describe the
same rows: every evaluator records, for each set it scored, the row count and the rows' fingerprints (`rows`, see
`erasus_hf.data.fingerprint.describe_rows`), and a consumer refuses a reference whose rows differ
(`check_same_rows`), before its expensive passes. A JSON written before the fingerprints existed is still read; then
only the row counts (the lengths of its per-example logs) can be compared, and a warning says so.

`intervals` holds a confidence interval for the metrics that have one (the MIA AUCs, MUSE's PrivLeak AUC): metric
name -> ``{"low", "high", "level", "method", "resamples", "seed"}``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.fingerprint import row_difference


class ReferenceRowsWarning(UserWarning):
    """A reference evaluation's rows could only be compared by count (it holds no row fingerprints)."""


@dataclass
class EvaluationResult:
    """`summary`: metric name -> number (`"tofu/forget_quality"`, `"mia/min_k_plus_plus_auc"`, ...);
    `per_example`: metric name -> one value per example; `meta`: what was evaluated and how; `rows`: scored set
    (``"tofu/forget"``, ``"mia/nonmembers"``, ...) -> its count and fingerprints; `intervals`: metric name -> its
    confidence interval. `source`: the file it was loaded from (for messages; not saved)."""

    summary: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    intervals: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def update(self, other: EvaluationResult) -> EvaluationResult:
        """Add another result's entries (a suite merges its evaluators' results); metric names must not collide. A
        row set recorded by both with different rows is dropped (no one description holds; a later reference check
        then falls back to the row counts)."""
        pairs = ((self.summary, other.summary), (self.per_example, other.per_example))
        for mine, theirs in (*pairs, (self.intervals, other.intervals)):
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"Metric names evaluated twice: {sorted(clash)}")
            mine.update(theirs)
        clash = {name for name in set(self.rows) & set(other.rows) if self.rows[name] != other.rows[name]}
        self.rows.update(other.rows)
        for name in clash:  # two evaluators of one name on different rows: no one description holds for the set
            del self.rows[name]
        self.meta.update(other.meta)
        return self

    def save(self, path: str | Path) -> None:
        """Write the JSON, redacted (`erasus_hf.redaction`: no token in a path or note of `meta`)."""
        from ..redaction import redact_json

        Path(path).write_text(json.dumps(redact_json(self.to_dict()), indent=2, allow_nan=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "per_example": self.per_example,
            "meta": self.meta,
            "rows": self.rows,
            "intervals": self.intervals,
        }

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        """Read a JSON written by `save` (one without `rows` / `intervals`, from an older erasus-hf, too)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "summary" not in data or "per_example" not in data:
            raise ValueError(f"{path} is not an erasus-hf evaluation JSON (no 'summary'/'per_example').")
        rows, intervals = data.get("rows", {}), data.get("intervals", {})
        if not isinstance(rows, dict) or not all(isinstance(v, dict) and "count" in v for v in rows.values()):
            raise ValueError(f"{path}: 'rows' must map each scored set to its count and fingerprints.")
        return cls(data["summary"], data["per_example"], data.get("meta", {}), rows, intervals, source=str(path))

    def row_count(self, name: str) -> int | None:
        """How many rows set `name` (``"tofu/forget"``) had: from `rows`, else (a JSON without fingerprints) from
        the per-example logs named after the set (``tofu/forget_*``, ``mia/*_members``) or ``meta[name + "_rows"]``;
        None when nothing says."""
        if name in self.rows:
            return int(self.rows[name]["count"])
        prefix, _, part = name.partition("/")
        lengths = {
            len(values)
            for key, values in self.per_example.items()
            if key.startswith(f"{name}_") or (key.startswith(f"{prefix}/") and key.endswith(f"_{part}"))
        }
        if isinstance(self.meta.get(f"{name}_rows"), int):
            lengths.add(self.meta[f"{name}_rows"])
        return lengths.pop() if len(lengths) == 1 else None

    def check_same_rows(self, rows: Mapping[str, Mapping[str, Any]], names: Sequence[str], what: str) -> None:
        """Refuse this result as the reference of `what` (e.g. ``"Forget quality"``) unless it scored, for every
        set in `names`, the rows `rows[name]` describes (`erasus_hf.data.fingerprint.describe_rows`: same count,
        same rows in any order). Without fingerprints for a set (an older JSON, a hand-made result) only the row
        count is compared, and a warning says so; without a count either, the warning says the rows went
        unchecked."""
        where = f"The reference evaluation{f' ({self.source})' if self.source else ''}"
        unchecked = []
        for name in names:
            mine = rows[name]
            if name in self.rows:
                problem = row_difference(self.rows[name], mine)
                if problem is not None:
                    raise ValueError(
                        f"{what}: {where} did not score the same {name!r} rows as this evaluation: {problem}. "
                        "Evaluate the reference model on the same rows (same split, same --max_examples)."
                    )
                continue
            count = self.row_count(name)
            if count is not None and count != mine["count"]:
                raise ValueError(
                    f"{what}: {where} scored {count} {name!r} rows, this evaluation {mine['count']}. Evaluate the "
                    "reference model on the same rows (same split, same --max_examples)."
                )
            unchecked.append(f"{name}: {'unknown' if count is None else count} vs {mine['count']} rows")
        if unchecked:
            warnings.warn(
                f"{what}: {where} holds no row fingerprints (an older erasus-hf JSON or a hand-made result), so only "
                f"row counts could be compared (reference vs this evaluation: {'; '.join(unchecked)}); the rows "
                "themselves were not checked. Re-evaluate the reference model to record them.",
                ReferenceRowsWarning,
                stacklevel=3,
            )

    def require(self, key: str, what: str) -> list[float]:
        """A per-example log another metric needs, with a clear error when this result lacks it."""
        if key not in self.per_example:
            raise KeyError(
                f"{what} needs the per-example log {key!r} in the reference evaluation; it has "
                f"{sorted(self.per_example)}. Evaluate the reference model with the same benchmark and split."
            )
        values = self.per_example[key]
        if any(not math.isfinite(v) for v in values):
            raise ValueError(f"The reference log {key!r} holds non-finite values.")
        return values
