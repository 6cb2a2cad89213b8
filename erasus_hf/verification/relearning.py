"""The relearning test: how fast does the forget set's accuracy come back under fine-tuning, compared with a model
retrained without it? A model that relearns much faster than retraining still holds the knowledge (Lynch et al.
2024, arXiv:2402.16835; Hu et al. 2024, arXiv:2406.13356; Hayes et al. 2025 use the same comparison with retraining).

Both models are fine-tuned on the same part of the forget rows (`evaluation.robustness.relearning_attack`: a copy,
the same seeded batches, the same optimizer) and measured on the rest after each number of steps of a grid; the
run to n steps is the prefix of the run to m > n steps (same seed, same batches), so the grid points form one
relearning curve. The statistic is each evaluation row's relearned accuracy: its exact-memorization accuracy averaged
over the grid steps (step 0 left out), i.e. what the model knows once an attacker has fine-tuned it a little, both
what it still showed and what was only hidden. It is compared with the retrained model's after the same steps, row
by row, with the one-sided Wilcoxon signed-rank test (the alternative: the audited model knows more). Each row's
gain (relearned accuracy minus its accuracy before relearning) is reported too: a model that relearns fast but
started low has a large gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset
from scipy import stats
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..evaluation.robustness import relearning_attack


def check_step_grid(steps: Sequence[int]) -> tuple[int, ...]:
    """`steps` as a strictly increasing tuple of positive step counts."""
    grid = tuple(steps)
    if not grid or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in grid):
        raise ValueError(f"relearn_steps must be positive step counts, e.g. (4, 8, 16); got {steps!r}")
    if list(grid) != sorted(set(grid)):
        raise ValueError(f"relearn_steps must be strictly increasing, got {steps!r}")
    return grid


def split_rows(rows: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(relearn rows, evaluation rows): a seeded random `fraction` of `rows` to fine-tune on, the rest to measure;
    both non-empty."""
    if not 0 < fraction < 1:
        raise ValueError(f"relearn_fraction must be in (0, 1), got {fraction}")
    if len(rows) < 2:
        raise ValueError(
            f"The relearning test needs at least 2 forget rows (some to relearn, some to measure), got {len(rows)}."
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    return rows.select(sorted(order[:cut].tolist())), rows.select(sorted(order[cut:].tolist()))


def relearning_curve(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    relearn_rows: Dataset,
    eval_rows: Dataset,
    steps: Sequence[int],
    **options: Any,
) -> dict[str, Any]:
    """The forget accuracy of `eval_rows` after 0 and each of `steps` relearning steps on `relearn_rows`
    (`relearning_attack` with `options`: learning_rate, batch_size, seed, text_format, ...): ``{"steps": [0, ...],
    "accuracy": [mean over rows, per grid point], "per_example": [[row accuracies], per grid point], "relearned":
    [each row's mean accuracy over the grid steps after 0], "gain": [each row's relearned accuracy minus its accuracy
    at step 0]}``. `model` is not modified."""
    grid = check_step_grid(steps)
    per_example: list[list[float]] = []
    for n in grid:
        run = relearning_attack(model, tokenizer, relearn_rows, eval_rows, steps=n, **options)
        if not per_example:
            per_example.append(run["per_example"]["forget_accuracy_before"])
        per_example.append(run["per_example"]["forget_accuracy_after"])
    return curve_from_table([0, *grid], per_example)


def curve_from_table(steps: Sequence[int], per_example: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The curve of `relearning_curve` from its table: `per_example[g][i]` = row i's accuracy at grid step
    `steps[g]` (`steps[0]` = 0, before relearning)."""
    table = np.asarray(per_example, dtype=float)
    if table.ndim != 2 or table.shape[0] != len(steps) or len(steps) < 2 or steps[0] != 0:
        raise ValueError(f"A relearning table needs one row per grid step, starting at step 0; got {table.shape}.")
    return {
        "steps": list(steps),
        "accuracy": table.mean(1).tolist(),
        "per_example": table.tolist(),
        "relearned": table[1:].mean(0).tolist(),
        "gain": (table[1:] - table[0]).mean(0).tolist(),
    }


def steps_to(curve: dict[str, Any], target: float) -> int | None:
    """The first grid step at which the curve's mean accuracy reaches `target`; None if it never does."""
    for step, accuracy in zip(curve["steps"], curve["accuracy"], strict=True):
        if accuracy >= target - 1e-12:
            return step
    return None


def compare_curves(
    audited: dict[str, Any], retrained: dict[str, Any], target_accuracy: float | None = None
) -> dict[str, Any]:
    """The comparison of two relearning curves on the same rows: ``{"statistic": mean relearned-accuracy difference
    (audited - retrained), "p_value": one-sided Wilcoxon signed-rank (the audited model knows more after relearning),
    "gain": mean gain of each}``, and with `target_accuracy`
    (e.g. the forget accuracy before unlearning: "until its accuracy returns") ``"steps_audited"`` /
    ``"steps_retrained"``, the grid steps each needs to reach it (None: not within the grid), and ``"speedup"`` =
    steps_retrained / steps_audited when both reach it. Rows with no difference are left out of the Wilcoxon test
    (its default); with no difference at all the p-value is 1."""
    a, r = np.asarray(audited["relearned"]), np.asarray(retrained["relearned"])
    difference = a - r
    if np.allclose(difference, 0):
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(a, r, alternative="greater").pvalue)
    out: dict[str, Any] = {
        "statistic": float(difference.mean()),
        "p_value": p_value,
        "gain": {"audited": float(np.mean(audited["gain"])), "retrained": float(np.mean(retrained["gain"]))},
    }
    if target_accuracy is not None:
        steps_audited, steps_retrained = steps_to(audited, target_accuracy), steps_to(retrained, target_accuracy)
        speedup = None
        if steps_audited and steps_retrained is not None:
            speedup = steps_retrained / steps_audited
        out.update(
            target_accuracy=target_accuracy,
            steps_audited=steps_audited,
            steps_retrained=steps_retrained,
            speedup=speedup,
        )
    return out
