"""One evaluation's numbers: summary metrics and per-example logs, saved as JSON that later runs read back.

The JSON of a retain-model run is the *reference* of forget quality (its per-example forget truth ratios) and of
MUSE's PrivLeak (its MIA AUC): `erasus-hf evaluate ... --reference retain_eval.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvaluationResult:
    """`summary`: metric name -> number (`"tofu/forget_quality"`, `"mia/min_k_plus_plus_auc"`, ...);
    `per_example`: metric name -> one value per example; `meta`: what was evaluated and how."""

    summary: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def update(self, other: EvaluationResult) -> EvaluationResult:
        """Add another result's entries (a suite merges its evaluators' results); names must not collide."""
        for mine, theirs in ((self.summary, other.summary), (self.per_example, other.per_example)):
            clash = set(mine) & set(theirs)
            if clash:
                raise ValueError(f"Metric names evaluated twice: {sorted(clash)}")
            mine.update(theirs)
        self.meta.update(other.meta)
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "per_example": self.per_example, "meta": self.meta}

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "summary" not in data or "per_example" not in data:
            raise ValueError(f"{path} is not an erasus-hf evaluation JSON (no 'summary'/'per_example').")
        return cls(data["summary"], data["per_example"], data.get("meta", {}))

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
