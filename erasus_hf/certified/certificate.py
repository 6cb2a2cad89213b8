"""What a certified removal guarantees, in numbers: the noise scale for (epsilon, delta), the gradient-residual budget
it buys, how much of it the training and the removals used, and the certificate as JSON and as a model-card block.

Theorem 3 of Guo et al. (ICML 2020): if the removal leaves a gradient residual ``||grad L_b(w^-; D')|| <= eps'`` and
the training noise is ``b ~ N(0, sigma^2 I)`` with ``sigma = c eps' / epsilon``, the removal is (epsilon, delta)-
certified with ``delta = 1.5 exp(-c^2 / 2)``. So for a chosen (epsilon, delta) and noise scale sigma, the residual the
removals may accumulate before the head must be retrained (Algorithm 2) is ``sigma * epsilon / c`` with
``c = sqrt(2 ln(1.5 / delta))``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REFERENCE = "Guo, Goldstein, Hannun, van der Maaten, Certified Data Removal from Machine Learning Models, ICML 2020"


class AssumptionError(ValueError):
    """A request outside the assumptions Guo et al.'s certificate rests on (the message names the assumption)."""


class BudgetExhaustedError(RuntimeError):
    """A removal would take the accumulated residual past the budget (with ``on_budget_exhausted="raise"``)."""


def noise_constant(delta: float) -> float:
    """``c = sqrt(2 ln(1.5 / delta))``: Theorem 3's delta = 1.5 exp(-c^2 / 2), solved for c."""
    return math.sqrt(2 * math.log(1.5 / delta))


def residual_budget(epsilon: float, delta: float, noise_std: float) -> float:
    """The gradient residual that noise of standard deviation `noise_std` masks at (epsilon, delta): sigma eps / c."""
    return noise_std * epsilon / noise_constant(delta)


def noise_std_for(epsilon: float, delta: float, budget: float) -> float:
    """The noise standard deviation that buys a residual budget `budget` at (epsilon, delta): c eps' / epsilon."""
    return noise_constant(delta) * budget / epsilon


@dataclass(frozen=True)
class RemovalCertificate:
    """The state of a certified-removal head: its (epsilon, delta), the noise that masks the residual, the residual
    budget that noise buys, what training and Newton removals used of it, and what the head is.

    `removals_since_training` rows are covered by the (epsilon, delta) statement (removed by Newton steps since the
    head was last trained); rows removed before a retraining are gone exactly (the head was trained without them)."""

    epsilon: float
    delta: float
    noise_std: float
    residual_budget: float
    training_residual: float
    removal_residual: float
    removals: int
    removals_since_training: int
    retrains: int
    rows: int
    head: str
    classes: int
    lam: float
    loss: str
    gamma: float
    features: int
    feature_source: str
    normalized: bool = True

    @property
    def noise_constant(self) -> float:
        return noise_constant(self.delta)

    @property
    def residual_used(self) -> float:
        """Training residual plus the accumulated Newton-step bounds: a bound on the head's gradient residual."""
        return self.training_residual + self.removal_residual

    @property
    def budget_left(self) -> float:
        return self.residual_budget - self.residual_used

    @property
    def certified(self) -> bool:
        return self.residual_used <= self.residual_budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "certified removal: loss perturbation + one Newton step per removal",
            "reference": REFERENCE,
            **asdict(self),
            "noise_constant": self.noise_constant,
            "residual_used": self.residual_used,
            "budget_left": self.budget_left,
            "certified": self.certified,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def summary(self) -> str:
        """The guarantee in one line (for the card's `certification`, quoted in its Limitations section)."""
        if not self.certified:
            return "no certified removal: the gradient residual exceeds the budget (the head must be retrained)"
        return (
            f"({_number(self.epsilon)}, {_number(self.delta)})-certified removal (Guo et al., ICML 2020) of the "
            f"{self.removals_since_training} rows deleted since the head was last trained ({self.head} on fixed "
            f"features; gradient residual {_number(self.residual_used)} of the budget {_number(self.residual_budget)})"
        )

    def to_markdown(self) -> str:
        """A short block for the model card: the guarantee in one sentence, the numbers behind it, what it leaves
        out."""
        earlier = self.removals - self.removals_since_training
        retrained = f" {earlier} earlier rows were removed by retraining the head from scratch." if earlier else ""
        status = (
            f"({_number(self.epsilon)}, {_number(self.delta)})-certified removal (Guo et al., ICML 2020) of the "
            f"{self.removals_since_training} rows deleted since the head was last trained: the head "
            "is distributed, up to a factor e^ε and an additive δ, as a head trained from scratch without them."
            if self.certified
            else "NOT certified: the gradient residual exceeds the budget; retrain the head."
        )
        lines = [
            "### Certified removal",
            "",
            status + retrained,
            "",
            "| | |",
            "|---|---|",
            f"| Head | {self.head}, λ = {_number(self.lam)}, on {self.features} "
            f"{'L2-normalised features' if self.normalized else 'features of norm ≤ 1'} ({self.feature_source}) |",
            f"| Loss perturbation | b ~ N(0, σ²I), σ = {_number(self.noise_std)}, drawn anew at each training, never "
            "saved |",
            f"| Residual budget σε/c (c = √(2 ln(1.5/δ)) = {self.noise_constant:.3f}) | "
            f"{_number(self.residual_budget)} |",
            f"| Residual used (training + Newton steps) | {_number(self.residual_used)} "
            f"({_number(self.training_residual)} + {_number(self.removal_residual)}) |",
            f"| Budget left | {_number(self.budget_left)} |",
            f"| Rows in the head / removed / retrainings | {self.rows} / {self.removals} / {self.retrains} |",
            "",
            "The guarantee covers this linear head only. Its features must come from a body that never trained on the "
            "removed rows (frozen or publicly pre-trained); it says nothing about other copies of the data.",
        ]
        return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.3g}"
