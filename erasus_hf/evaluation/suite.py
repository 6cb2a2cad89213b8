"""`MetricSuite`: several evaluators, one model, one `EvaluationResult`.

`MetricSuite(["tofu", "mia", "memorization"]).run(model, tokenizer, tofu=TOFUDataset.load("forget10"),
holdout=holdout_rows, reference="retain_eval.json")` builds each named evaluator from the data given to `run`
(evaluator objects can be passed instead of names), runs them, and merges their numbers. The saved JSON is the
reference input of a later run's forget quality (TOFU) and PrivLeak (MUSE). Every evaluator's reference check
(`Evaluator.check_reference`: the reference scored the same rows, holds the numbers needed) runs before the first
evaluator's forward pass, so a wrong reference costs no compute. Names are looked up in `EVALUATORS` (see
`evaluation.base`); an evaluator object that does not subclass `Evaluator` runs with the declared defaults (no rows,
no reference check).

Formatting. `run(..., text_format=...)` gives one `data.formats.TextFormat` to every evaluator it builds by name that
renders text (TOFU, MUSE, MIA, memorization), so they score and prompt as the model was trained (the trainer passes
its own, with its row formats); a per-name option (`options={"tofu": {"text_format": ...}}`) wins for that evaluator,
and evaluator objects keep their own. `meta["text_format"]` records the format (`TextFormat.describe`, with the
trained row formats under ``rows`` when given); an evaluator that rendered differently keeps its own record under
``meta["{name}/text_format"]``.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data.formats import TextFormat
from .base import EVALUATORS, Evaluator, SuiteData
from .callbacks import RowCheckingCallback
from .result import EvaluationResult, ReferenceRowsWarning


def combined_score(forget_quality: float, model_utility: float) -> float:
    """sqrt(forget quality x model utility): one number for `metric_for_best_model` that rewards a 10x better
    forget quality (a p-value, spread over orders of magnitude) as much as a 10x better model utility."""
    return math.sqrt(max(forget_quality, 0.0) * max(model_utility, 0.0))


class MetricSuite:
    """Run evaluators and merge their results.

    Args:
        evaluators: names from `EVALUATORS` and/or evaluator objects.
        options: per-name keyword arguments for the named evaluators, e.g. `{"tofu": {"batch_size": 16}}`.
        max_new_tokens: the most new tokens of a TOFU ROUGE generation (None: `TOFUEvaluator`'s default, 200 as
            open-unlearning); shorthand for `options={"tofu": {"max_new_tokens": ...}}`.
        generation_batch_size: prompts per `generate` call of the TOFU ROUGE generation (None: the TOFU
            `batch_size`); shorthand for `options={"tofu": {"generation_batch_size": ...}}`.
    """

    def __init__(
        self,
        evaluators: Sequence[str | Evaluator],
        options: dict[str, dict[str, Any]] | None = None,
        max_new_tokens: int | None = None,
        generation_batch_size: int | None = None,
    ) -> None:
        if not evaluators:
            raise ValueError(f"MetricSuite needs at least one evaluator; valid names: {', '.join(EVALUATORS)}")
        unknown = [e for e in evaluators if isinstance(e, str) and e not in EVALUATORS]
        if unknown:
            raise ValueError(f"Unknown evaluator(s) {unknown}; valid names: {', '.join(EVALUATORS)}")
        self.evaluators = list(evaluators)
        self.options = {name: dict(kwargs) for name, kwargs in (options or {}).items()}
        tofu = self.options.setdefault("tofu", {})
        for key, value in (("max_new_tokens", max_new_tokens), ("generation_batch_size", generation_batch_size)):
            if value is None:
                continue
            if key in tofu and tofu[key] != value:
                raise ValueError(
                    f"{key} is given twice, {value} and options['tofu'][{key!r}] = {tofu[key]}; give one."
                )
            tofu[key] = value

    def run(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        tofu: Any = None,
        muse: Any = None,
        forget: Any = None,
        retain: Any = None,
        holdout: Any = None,
        reference: EvaluationResult | str | Path | None = None,
        text_format: TextFormat | None = None,
        row_formats: Mapping[str, str] | None = None,
    ) -> EvaluationResult:
        """Evaluate `model`. `forget`/`retain` default to the TOFU data's splits; `holdout` (never trained on) is
        the non-member set of membership inference; `reference` (a result or its JSON path) is the retain-model run
        that forget quality and PrivLeak compare against. `text_format`: how the evaluators built by name render
        rows (the trainer's `text_format`; None: each evaluator's default, `TextFormat()`); `row_formats`: the formats
        the model was unlearned on (the trainer's `row_formats`, e.g. ``{"forget": "text", "retain": "qa"}``),
        recorded in ``meta["text_format"]["rows"]``."""
        if isinstance(reference, (str, Path)):
            reference = EvaluationResult.load(reference)
        data = dict(tofu=tofu, muse=muse, forget=forget, retain=retain, holdout=holdout)
        evaluators = self.build(**data, text_format=text_format)
        self._check_references(evaluators, reference)  # every reference check before the first forward pass
        result = EvaluationResult(meta={"model": type(model).__name__, "evaluators": []})
        formats: dict[str, dict] = {}
        for evaluator in evaluators:
            start = time.perf_counter()
            with warnings.catch_warnings():  # the evaluator checks its reference again: warned once, above
                warnings.simplefilter("ignore", ReferenceRowsWarning)
                part = evaluator.evaluate(model, tokenizer, reference=reference)
            part.meta[f"{evaluator.name}/seconds"] = round(time.perf_counter() - start, 3)
            if "text_format" in part.meta:
                formats[evaluator.name] = part.meta.pop("text_format")
            result.update(part)
            result.meta["evaluators"].append(evaluator.name)
        record_text_formats(result.meta, formats, row_formats)
        summary = result.summary
        if "tofu/forget_quality" in summary and "tofu/model_utility" in summary:
            summary["combined_score"] = combined_score(summary["tofu/forget_quality"], summary["tofu/model_utility"])
        return result

    def build(
        self,
        *,
        tofu: Any = None,
        muse: Any = None,
        forget: Any = None,
        retain: Any = None,
        holdout: Any = None,
        text_format: TextFormat | None = None,
    ) -> list[Evaluator]:
        """The evaluators `run` would run on this data (named ones built, objects as given); no forward pass. Those
        built by name that take a `text_format` get this one unless their options name another."""
        if tofu is not None:
            forget = forget if forget is not None else tofu.forget
            retain = retain if retain is not None else tofu.retain
        data = {"tofu": tofu, "muse": muse, "forget": forget, "retain": retain, "holdout": holdout}
        return [
            self._build_one(spec, data, text_format) if isinstance(spec, str) else spec for spec in self.evaluators
        ]

    def _build_one(self, name: str, data: dict[str, Any], text_format: TextFormat | None) -> Evaluator:
        cls = EVALUATORS.lookup(name)
        options = dict(self.options.get(name, {}))
        if text_format is not None and "text_format" in inspect.signature(cls).parameters:
            options.setdefault("text_format", text_format)  # the evaluator's own option wins
        return cls.from_suite_data(SuiteData(name, data), **options)

    def check(
        self,
        reference: EvaluationResult | str | Path | None = None,
        callbacks: Iterable[Any] = (),
        **data: Any,
    ) -> None:
        """What `run` on `data` would refuse, refused now (the trainer calls it before training): the `reference`
        of forget quality / PrivLeak, and the reference of every `RowCheckingCallback` among `callbacks` (e.g.
        `UnlearningEarlyStoppingCallback`), against the rows these evaluators would score. No forward pass."""
        callbacks = [c for c in callbacks if isinstance(c, RowCheckingCallback)]
        if reference is None and not callbacks:
            return
        if isinstance(reference, (str, Path)):
            reference = EvaluationResult.load(reference)
        evaluators = self.build(**data)
        self._check_references(evaluators, reference)
        rows: dict[str, dict] = {}
        for evaluator in evaluators:
            if isinstance(evaluator, Evaluator):  # any other object: the declared default, no rows
                rows.update(evaluator.rows())
        for callback in callbacks:
            callback.check_rows(rows)

    @staticmethod
    def _check_references(evaluators: Sequence[Evaluator], reference: EvaluationResult | None) -> None:
        if reference is None:
            return
        for evaluator in evaluators:
            if isinstance(evaluator, Evaluator):  # any other object: the declared default, nothing to check
                evaluator.check_reference(reference)


def record_text_formats(
    meta: dict[str, Any], formats: Mapping[str, Mapping[str, Any]], row_formats: Mapping[str, str] | None
) -> None:
    """`meta["text_format"]`: how the evaluators rendered rows (`formats`: evaluator name -> its
    `TextFormat.describe`), with `row_formats` (the formats trained on) under ``rows``; an evaluator whose rendering
    differs from the first one's keeps its own under ``meta["{name}/text_format"]``. Nothing when no evaluator
    rendered text (a classifier's)."""
    if not formats:
        return
    first = next(iter(formats.values()))
    meta["text_format"] = {**first, "rows": dict(row_formats)} if row_formats else dict(first)
    for name, described in formats.items():
        if described != first:
            meta[f"{name}/text_format"] = dict(described)
