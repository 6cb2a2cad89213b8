"""A run's coreset: the forget and/or retain side reduced to `coreset_fraction` of its rows before training, and
the training budget of a reduced forget set.

The budget rule (`coreset_budget`): an epoch is a pass over the forget set, so a forget coreset of 5% trains for 5%
of the steps at the same number of epochs. Pal et al. (2025, arXiv:2504.10185) find that a small forget subset
unlearns as well as the whole set *given the same training length*, so the default "steps" sets `max_steps` to the
number of optimizer steps the full forget set would have trained for (num_train_epochs x ceil(ceil(ceil(n /
world_size) / per_device_train_batch_size) / gradient_accumulation_steps), as the Trainer counts them). "epochs"
keeps the epochs (fewer steps). A `max_steps` set by the user is kept either way. A retain coreset changes nothing
of the budget: retain rows are partners of the forget rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .features import example_features
from .selectors import (
    check_coreset_options,
    feature_kind,
    get_selector,
)

if TYPE_CHECKING:  # the objectives import the config, which imports this package's options
    from ..objectives import Objective

logger = logging.getLogger(__name__)


@dataclass
class SideSelection:
    """What was kept of one side: `kept` of `rows` (examples: rows, or windows of text rows) by `selector`."""

    side: str
    selector: str
    hyperparameters: dict[str, Any]
    features: str | None
    fraction: float
    rows: int
    kept: int
    seed: int
    seconds: float
    indices: list[int] = field(repr=False)


@dataclass
class CoresetReport:
    """The run's coreset: each reduced side, and the budget: "steps" (`max_steps` = `full_set_steps`, the full
    forget set's), "epochs" (`max_steps` None) or "max_steps" (the user's, kept)."""

    sides: dict[str, SideSelection]
    budget: str
    max_steps: int | None
    full_set_steps: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "sides": {k: asdict(v) for k, v in self.sides.items()},
            "budget": self.budget,
            "max_steps": self.max_steps,
            "full_set_steps": self.full_set_steps,
        }

    def log_values(self) -> dict[str, float]:
        """The numbers logged when training starts (`coreset/<side>_kept`, `_rows`, `_seconds`, `max_steps`)."""
        values: dict[str, float] = {}
        for side, s in self.sides.items():
            values.update(
                {f"coreset/{side}_kept": s.kept, f"coreset/{side}_rows": s.rows, f"coreset/{side}_seconds": s.seconds}
            )
        if self.max_steps is not None:
            values["coreset/max_steps"] = self.max_steps
        return values

    def card_line(self) -> str:
        """One line for the model card, e.g. ``herding kept 30 of 600 retain rows (5%, embeddings, 0.4 s)``."""
        parts = [
            f"`{s.selector}` kept {s.kept} of {s.rows} {s.side} examples ({s.fraction:.0%}, "
            f"{s.features or 'no features'}, seed {s.seed}, {s.seconds:.1f} s)"
            for s in self.sides.values()
        ]
        if "forget" in self.sides:
            if self.budget == "steps":
                parts.append(f"trained for the full forget set's {self.max_steps} optimizer steps")
            elif self.budget == "max_steps":
                parts.append(f"trained for the given max_steps={self.max_steps}")
            else:
                parts.append("trained for the configured epochs over the reduced forget set")
        return "; ".join(parts)


def full_set_steps(rows: int, args: Any) -> int:
    """Optimizer steps of `args.num_train_epochs` over `rows` forget examples, as `Trainer` counts them."""
    per_process = math.ceil(rows / max(args.world_size, 1))
    batches = math.ceil(per_process / args.per_device_train_batch_size)
    updates = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * updates)


def apply_coreset(
    args: Any,
    model: nn.Module,
    objective: Objective,
    collator: Callable[[list[dict]], dict[str, Any]],
    forget: Any,
    retain: Any | None,
) -> tuple[Any, Any | None, CoresetReport]:
    """Reduce the prepared (tokenized) `forget` and/or `retain` sides per `args.coreset*`; the report's `max_steps`
    is what the run must train for (None: `num_train_epochs`). `args` is not changed. The features come from
    `model` as it is (the starting model, with its fresh adapter)."""
    selector = get_selector(args.coreset, **args.coreset_kwargs)
    check_coreset_options(selector, args.coreset_side, retain is not None)
    wanted = ("forget", "retain") if args.coreset_side == "both" else (args.coreset_side,)
    kind = feature_kind(selector, args.coreset_features)
    features_of: dict[str, Any] = {}

    def features(side: str, rows: Any) -> Any:
        if side not in features_of:
            features_of[side] = example_features(
                kind,
                model,
                objective,
                collator,
                rows,
                batch_size=args.per_device_eval_batch_size,
                seed=args.seed,
                desc=f"Coreset {kind} ({side})",
                disable_tqdm=args.disable_tqdm,
            )
        return features_of[side]

    sides, data = {}, {"forget": forget, "retain": retain}
    for side in ("forget", "retain"):  # the forget side first: forget_similar reads the full forget set's features
        if side not in wanted:
            continue
        rows = data[side]
        k = max(1, round(args.coreset_fraction * len(rows)))
        start = time.perf_counter()
        x = features(side, rows) if kind is not None else None
        anchor = features("forget", forget) if selector.needs_forget else None
        indices = selector.select(k, x, n=len(rows), seed=args.seed, forget_features=anchor)
        sides[side] = SideSelection(
            side=side,
            selector=selector.name,
            hyperparameters=selector.hyperparameters,
            features=kind,
            fraction=args.coreset_fraction,
            rows=len(rows),
            kept=len(indices),
            seed=args.seed,
            seconds=time.perf_counter() - start,
            indices=indices.tolist(),
        )
        logger.info("Coreset: %s", sides[side])
    max_steps = full = None
    budget = args.coreset_budget
    if "forget" in sides:
        full = full_set_steps(len(forget), args)
        if args.max_steps > 0:
            budget, max_steps = "max_steps", args.max_steps
        elif budget == "steps":
            max_steps = full
    reduced = {side: data[side].select(s.indices) for side, s in sides.items()}
    report = CoresetReport(sides=sides, budget=budget, max_steps=max_steps, full_set_steps=full)
    return reduced.get("forget", forget), reduced.get("retain", retain), report
