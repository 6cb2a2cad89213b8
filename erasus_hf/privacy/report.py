"""What a DP-SGD run certifies: `DPReport`, written as `privacy.json` beside the weights and as a model-card block.

This module imports no Opacus, so a card or a result can be read and rendered where Opacus is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

PRIVACY_FILE = "privacy.json"
"""The report's file in a saved model folder (and in each checkpoint: the epsilon spent up to it)."""


def require_opacus() -> ModuleType:
    """The `opacus` module, or an ImportError that says how to install it (it is an optional dependency)."""
    try:
        import opacus
    except ImportError as err:
        raise ImportError(
            "Differentially private training needs Opacus: pip install opacus (or pip install 'erasus_hf[privacy]')."
        ) from err
    return opacus


@dataclass
class DPReport:
    """The (epsilon, delta) guarantee of a DP-SGD run, as its accountant computes it, and the settings behind it.

    `epsilon` is the accountant's, for `delta`, over the `steps` noisy steps taken (infinite when the noise was 0);
    with a `target_epsilon` and every planned step taken it lies in `[target_epsilon - epsilon_tolerance,
    target_epsilon]`. The unit of privacy is one training example (`examples` of them: one per row).
    """

    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    steps: int
    planned_steps: int
    examples: int
    target_epsilon: float | None
    epsilon_tolerance: float | None
    trained: str
    trainable_parameters: int
    secure_mode: bool
    opacus_version: str
    privacy_unit: str = "one training row"

    def group(self, k: int) -> tuple[float, float]:
        """The guarantee for a group of `k` rows (a person with k rows, e.g. a TOFU author's 20): (k eps,
        k e^((k-1) eps) delta), the group-privacy bound of (eps, delta)-DP (Dwork and Roth 2014, Thm 2.2 and its
        approximate-DP form). It grows fast: rows of one person are better merged into one row before training."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive number of rows, got {k!r}.")
        if math.isinf(self.epsilon):
            return math.inf, 1.0
        return k * self.epsilon, min(1.0, k * math.exp((k - 1) * self.epsilon) * self.delta)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: an infinite epsilon (no noise) is written as None."""
        values = dataclasses.asdict(self)
        if math.isinf(values["epsilon"]):
            values["epsilon"] = None
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DPReport:
        values = dict(values)
        if values.get("epsilon") is None:
            values["epsilon"] = math.inf
        return cls(**values)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PRIVACY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> DPReport | None:
        """The report saved in a model folder, or None when the model was not trained with DP."""
        path = Path(folder) / PRIVACY_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def summary(self) -> str:
        """One line, e.g. ``(epsilon = 7.99, delta = 1.25e-03)-DP per training row (prv accountant, 20 steps)``."""
        epsilon = "inf (no noise: no guarantee)" if math.isinf(self.epsilon) else f"{self.epsilon:.3g}"
        return (
            f"(epsilon = {epsilon}, delta = {self.delta:.3g})-DP per training row ({self.accountant} accountant, "
            f"{self.steps} steps)"
        )

    def card_section(self, subject: str = "This model") -> str:
        """The model card's block (markdown): the guarantee, its settings, and what it does and does not mean.
        `subject` names the DP-trained model: "This model" on its own card, e.g. "The starting model of this run" on
        the card of a model unlearned from it."""
        target = "none (noise given)" if self.target_epsilon is None else f"{self.target_epsilon:g}"
        rows = [
            ("epsilon (accountant)", "inf" if math.isinf(self.epsilon) else f"{self.epsilon:.4g}"),
            ("delta", f"{self.delta:.3g}"),
            ("target epsilon", target),
            ("accountant", f"`{self.accountant}`"),
            ("noise multiplier", f"{self.noise_multiplier:.4g}"),
            ("per-example clipping bound", f"{self.max_grad_norm:g}"),
            ("sampling rate (expected batch)", f"{self.sample_rate:.4g} ({self.expected_batch_size})"),
            ("noisy steps (planned)", f"{self.steps} ({self.planned_steps})"),
            ("training rows", str(self.examples)),
            ("trained", f"{self.trained} ({self.trainable_parameters:,} parameters)"),
            ("secure RNG", "yes" if self.secure_mode else "no"),
        ]
        table = "\n".join(["| setting | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])
        group_eps, group_delta = self.group(20)
        group = f"({group_eps:.3g}, {group_delta:.3g}) for 20 rows" + (
            ", which bounds nothing" if group_delta >= 1 else ""
        )
        return (
            "## Differential privacy\n\n"
            f"{subject} was fine-tuned with DP-SGD (Opacus {self.opacus_version}): {self.summary()}.\n\n"
            f"{table}\n\n"
            "What it gives: for every training row, the distribution of the released weights is the same up to a "
            "factor e^epsilon (plus delta) whether or not that row was trained on, so what anyone can learn about "
            "one row from the weights is bounded from the start, rows later named in a deletion request included. "
            "What it does not give: nothing is removed (a deletion request still needs unlearning, and the "
            "evaluation is its evidence); epsilon covers each row of the whole training set, not each request; a "
            f"person with k rows is covered only at (k epsilon, k e^((k-1) epsilon) delta), e.g. {group}; "
            "the training losses logged during the run are not privatised.\n"
        )
