"""Robustness of unlearning: does the forgotten knowledge come back after a little fine-tuning or after quantisation?

Two attacks on a COPY of the unlearned model (the caller's model is never modified):

- Relearning (Lynch et al. 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs", arXiv:2402.16835, Sec. on
  relearning; Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks",
  arXiv:2406.13356): fine-tune the copy for a few optimizer steps on a small part of the forget set and measure the
  forget metrics on the *rest* of it. Knowledge that was only suppressed comes back on rows never relearned.
- Quantisation (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization", arXiv:2410.16454):
  quantise the copy's Linear weights to int8 or int4 (`quantized_copy`, through transformers' quantisation configs)
  and measure the forget and retain metrics again (`quantization_report`); an unlearning update smaller than half a
  quantisation step rounds back to the original weight, and 4-bit steps are about 16 times coarser than 8-bit ones.

The forget metrics, both from one batched teacher-forced pass (`scoring.token_stats`, QA layout: prompt masked, EOS
appended and scored; the rows rendered as training renders them, `text_format`: the chat template when the tokenizer
has one, by default):

- forget probability: per example P = exp(-mean NLL of its answer tokens) (TOFU's length-normalised probability,
  Maini et al. 2024, arXiv:2401.06121), averaged over examples;
- forget accuracy: per example the exact memorization EM = (1/T) sum_t [argmax_z p(z | y_<t) == y_t] over its T
  answer tokens (Tirumala et al. 2022, arXiv:2205.10770), averaged over examples.
"""

from __future__ import annotations

import copy
import importlib
import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    QuantoConfig,
    TorchAoConfig,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..data.collator import QACollator
from ..data.formats import TextFormat
from ..objectives import CausalLMObjective, Objective
from .base import Evaluator
from .memorization import exact_memorization
from .result import EvaluationResult
from .scoring import TokenStats, check_qa_format, evaluation_format, mean_token_nll, qa_batches, token_stats

QA_COLUMNS = ("question", "answer")
METRICS = ("forget_prob", "forget_accuracy")


def _check_rows(rows: Dataset, what: str) -> None:
    missing = [c for c in QA_COLUMNS if c not in rows.column_names]
    if missing:
        raise ValueError(f"{what} needs the columns {list(QA_COLUMNS)}; missing {missing}, found {rows.column_names}.")
    if len(rows) == 0:
        raise ValueError(f"{what} is empty.")


def forget_stats_metrics(stats: list[TokenStats]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Summary and per-example forget metrics of scored examples (see the module docstring for the definitions):
    `forget_prob` = mean over examples of exp(-mean token NLL), `forget_accuracy` = mean over examples of the fraction
    of answer tokens whose teacher-forced argmax equals the label."""
    if not stats:
        raise ValueError("No scored examples.")
    probs = [math.exp(-s.nll) for s in stats]
    accuracies = [exact_memorization(s) for s in stats]
    summary = {"forget_prob": sum(probs) / len(probs), "forget_accuracy": sum(accuracies) / len(accuracies)}
    return summary, {"forget_prob": probs, "forget_accuracy": accuracies}


def forget_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    batch_size: int = 32,
    max_length: int = 512,
    desc: str | None = None,
    objective: Objective | None = None,
    text_format: TextFormat | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """`forget_stats_metrics` of `model` on QA `rows` (columns `question`, `answer`) rendered by `text_format` (None:
    `TextFormat()`), one batched no-grad pass, scored by `objective` (default `CausalLMObjective`)."""
    _check_rows(rows, "The forget rows")
    text_format = evaluation_format(text_format)
    check_qa_format(text_format, tokenizer, "The forget metrics")
    batches = qa_batches(tokenizer, rows["question"], rows["answer"], batch_size, max_length, text_format)
    stats = token_stats(model, batches, desc=desc, objective=objective)
    return forget_stats_metrics(stats)


def attack_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` to attack; a PEFT model's adapters are merged into the copy's weights (the attacker
    holds the weights, not the adapter structure). The caller's model is left as it is."""
    from peft import PeftModel

    clone = copy.deepcopy(model)
    if isinstance(clone, PeftModel):
        clone = clone.merge_and_unload()
    return clone


def _batches_forever(rows: list[dict[str, str]], batch_size: int, generator: torch.Generator) -> Iterator[list]:
    """Shuffled mini-batches of `rows`, epoch after epoch (the last batch of an epoch may be smaller)."""
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield [rows[i] for i in order[start : start + batch_size]]


def relearning_attack(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    relearn_rows: Dataset,
    eval_rows: Dataset,
    steps: int = 20,
    learning_rate: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_length: int = 512,
    eval_batch_size: int = 32,
    objective: Objective | None = None,
    text_format: TextFormat | None = None,
) -> dict:
    """Relearning attack (Lynch et al. 2024, arXiv:2402.16835; Hu et al. 2024, arXiv:2406.13356).

    A deep copy of `model` (`attack_copy`; every parameter trainable) is fine-tuned for `steps` AdamW steps on
    `relearn_rows` (plain mean NLL of the answer tokens in the `QACollator` layout of `text_format`, None =
    `TextFormat()`, the chat template when the tokenizer has one; scored by `objective`, default
    `CausalLMObjective`, with float32 logits as transformers' own loss; shuffled mini-batches of
    `batch_size` with `seed`, constant learning rate, gradient norm clipped to `max_grad_norm`). The forget metrics
    (`forget_prob`, `forget_accuracy`; module docstring) are measured on `eval_rows`, which must share no question
    with `relearn_rows`, before and after.

    Returns ``{"before": {metric: value}, "after": {...}, "recovered": {metric: after - before}, "steps": steps,
    "train_loss": [loss of each step], "per_example": {"forget_prob_before": [...], "forget_prob_after": [...],
    "forget_accuracy_before": [...], "forget_accuracy_after": [...]}}``.
    """
    _check_rows(relearn_rows, "The relearn rows")
    _check_rows(eval_rows, "The evaluation rows")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    overlap = set(relearn_rows["question"]) & set(eval_rows["question"])
    if overlap:
        raise ValueError(
            f"relearn_rows and eval_rows share {len(overlap)} question(s), e.g. {sorted(overlap)[:3]}; the attack "
            "is measured on forget rows it never trained on."
        )

    objective = CausalLMObjective() if objective is None else objective
    text_format = evaluation_format(text_format)
    scoring = dict(objective=objective, text_format=text_format)
    before = forget_metrics(model, tokenizer, eval_rows, eval_batch_size, max_length, **scoring)

    attacked = attack_copy(model)
    attacked.requires_grad_(True)
    attacked.train()
    device = next(attacked.parameters()).device
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=learning_rate, weight_decay=weight_decay)
    collator = QACollator(tokenizer, max_length=max_length, text_format=text_format)
    rows = [{"question": q, "answer": a} for q, a in zip(relearn_rows["question"], relearn_rows["answer"])]
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    batches = _batches_forever(rows, batch_size, generator)
    for _ in tqdm(range(steps), desc="relearning", leave=False):
        batch = {k: v.to(device) for k, v in collator(next(batches)).items()}
        loss = mean_token_nll(objective.score(attacked, batch), batch["labels"])  # over the tokens labelled, not -100
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Relearning loss became {loss.item()} at step {len(losses)}.")
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(attacked.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    attacked.eval()

    after = forget_metrics(attacked, tokenizer, eval_rows, eval_batch_size, max_length, **scoring)
    return {
        **side_by_side(("before", before), ("after", after), change="recovered"),
        "steps": steps,
        "train_loss": losses,
    }


def side_by_side(first: tuple[str, tuple], second: tuple[str, tuple], change: str) -> dict:
    """Two `forget_metrics` results as `{first: {...}, second: {...}, change: {metric: second - first},
    "per_example": {f"{metric}_{label}": [...]}}`."""
    (label_a, (a, a_rows)), (label_b, (b, b_rows)) = first, second
    return {
        label_a: a,
        label_b: b,
        change: {m: b[m] - a[m] for m in METRICS},
        "per_example": {
            f"{m}_{label}": rows[m] for m in METRICS for label, rows in ((label_a, a_rows), (label_b, b_rows))
        },
    }


@dataclass(eq=False, repr=False)
class RelearningEvaluator(Evaluator):
    """`relearning_attack` as an evaluator: summary `{name}/forget_prob_before`, `{name}/forget_prob_after`,
    `{name}/forget_accuracy_before`, `{name}/forget_accuracy_after` (and `..._recovered`), per-example
    `{name}/forget_prob_after` and `{name}/forget_accuracy_after` on `eval_rows`. The attack needs no reference
    run. `text_format` renders the rows (the trainer's; None = `TextFormat()`)."""

    relearn_rows: Dataset
    eval_rows: Dataset
    steps: int = 20
    learning_rate: float = 1e-4
    batch_size: int = 4
    seed: int = 0
    name: str = "relearn"
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = evaluation_format(self.text_format)

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        options = dict(steps=self.steps, learning_rate=self.learning_rate, batch_size=self.batch_size, seed=self.seed)
        rows = (self.relearn_rows, self.eval_rows)
        scoring = dict(objective=self.objective, text_format=self.text_format)
        out = relearning_attack(model, tokenizer, *rows, **options, **scoring)
        changes = ("before", "after", "recovered")
        summary = {f"{self.name}/{m}_{when}": out[when][m] for m in METRICS for when in changes}
        per_example = {f"{self.name}/{m}_after": out["per_example"][f"{m}_after"] for m in METRICS}
        meta = {
            self.name: {**options, "relearn_rows": len(self.relearn_rows), "eval_rows": len(self.eval_rows)},
            "text_format": self.text_format.describe(tokenizer),
        }
        return EvaluationResult(summary, per_example, meta)


QUANT_BACKENDS = ("quanto", "bitsandbytes", "torchao")


def _as_bits(bits: int | Sequence[int]) -> tuple[int, ...]:
    """`bits` as a tuple of distinct bit widths, each 8 or 4 (order kept)."""
    values = (bits,) if isinstance(bits, int) else tuple(bits)
    if not values or any(isinstance(b, bool) or b not in (8, 4) for b in values):
        raise ValueError(f"bits must be 8 or 4 (or a list of them, e.g. bits=(8, 4)), got {bits!r}")
    return tuple(dict.fromkeys(values))


def _one_bits(bits: int, what: str) -> int:
    if not isinstance(bits, int):
        raise ValueError(f"{what} takes one bit width (8 or 4), got {bits!r}; quantization_report takes several.")
    return _as_bits(bits)[0]


def _require(module: str, backend: str, install: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        other = "" if backend == "quanto" else "; or use backend='quanto', which runs int8 and int4 on CPU and GPU"
        raise RuntimeError(f"backend={backend!r} needs {install}{other}.") from error


def quantization_config(
    bits: int, backend: str = "quanto", device: torch.device | str = "cpu"
) -> QuantizationConfigMixin:
    """The transformers quantisation config of `bits`-bit weight-only quantisation with `backend`, once the backend
    is known to be installed and to run on `device` (see `quantized_copy` for what each one does).

    Raises a RuntimeError naming what to install (or which device is needed) when it cannot run, a ValueError for an
    unknown backend or a bit width other than 8 or 4."""
    bits = _one_bits(bits, "quantization_config")
    device = torch.device(device)
    if backend == "quanto":
        _require("optimum.quanto", backend, "optimum-quanto (`pip install optimum-quanto` or erasus_hf[quant])")
        return QuantoConfig(weights=f"int{bits}")
    if backend == "bitsandbytes":
        _require("bitsandbytes", backend, "bitsandbytes (`pip install bitsandbytes`) and a CUDA GPU for its kernels")
        return BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    if backend == "torchao":
        _require("torchao", backend, "torchao (`pip install torchao`)")
        if bits == 4 and device.type != "cuda":
            raise RuntimeError(
                f"torchao's int4 weight-only quantisation runs on CUDA GPUs (its int4 kernels), and the model is on "
                f"{device}; move the model to a GPU, or use backend='quanto', which runs int4 on CPU."
            )
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128))
    raise ValueError(f"backend must be one of {', '.join(QUANT_BACKENDS)}; got {backend!r}")


def quantized_copy(model: nn.Module, bits: int = 8, backend: str = "quanto") -> PreTrainedModel:
    """A copy of `model` whose Linear weights are quantised to `bits` (8 or 4) by `backend`, through transformers'
    own quantisation path: the model is saved (safetensors, a temporary folder) and reloaded with
    ``from_pretrained(folder, quantization_config=quantization_config(bits, backend))`` on the model's device and in
    its dtype. transformers quantises only while loading (it has no in-memory route), and this route keeps its choice
    of what stays in full precision: embeddings, norms and the output head (``lm_head``), as with every backend.
    A PEFT model is merged first, on a copy (`attack_copy`); the caller's model is untouched.

    Weight-only round-to-nearest, no calibration data, activations in full precision:

    - ``"quanto"`` (optimum-quanto, CPU and GPU; the default): ``QuantoConfig(weights="int8")``, symmetric per
      output channel (scale = max|w| / 127); ``QuantoConfig(weights="int4")``, min-max affine over groups of 128
      input weights (a whole row when it has 128 or fewer), 16 levels per group. On CPU the first int4 run compiles
      quanto's small C++ unpacking extension (a C++ compiler and ninja; about a minute, cached afterwards).
    - ``"bitsandbytes"`` (CUDA): ``BitsAndBytesConfig(load_in_8bit=True)`` (LLM.int8) and
      ``BitsAndBytesConfig(load_in_4bit=True)`` (FP4, absmax blocks of 64), exactly what the code of Zhang et al.
      2024 (arXiv:2410.16454, ``utils.load_model`` in zzwjames/FailureLLMUnlearning) loads its 8- and 4-bit models
      with.
    - ``"torchao"``: ``TorchAoConfig(Int8WeightOnlyConfig())`` (CPU and GPU) and
      ``TorchAoConfig(Int4WeightOnlyConfig(group_size=128))`` (CUDA only).

    How this relates to the paper: its code quantises with bitsandbytes round-to-nearest (a GPTQ path is there,
    commented out), and the paper adds GPTQ and AWQ, which calibrate on data; neither of those is implemented here.
    quanto's int4 is round-to-nearest too (INT4 min-max per group of 128 where bitsandbytes uses FP4 absmax per block
    of 64), so the mechanism the paper describes, an unlearning update smaller than half a quantisation step rounding
    back to the original weight, applies alike; the numbers are not bit-identical to the paper's setting, which
    ``backend="bitsandbytes"`` reproduces on a GPU.
    """
    from peft import PeftModel

    bits = _one_bits(bits, "quantized_copy")
    parameter = next(model.parameters())
    config = quantization_config(bits, backend, parameter.device)
    source = attack_copy(model) if isinstance(model, PeftModel) else model
    if not isinstance(source, PreTrainedModel):
        raise TypeError(
            "quantized_copy needs a transformers PreTrainedModel (or a PEFT model of one), got "
            f"{type(source).__name__}: it quantises by reloading the saved model with from_pretrained(..., "
            "quantization_config=...)."
        )
    with tempfile.TemporaryDirectory() as folder:
        source.save_pretrained(folder)
        quantized = type(source).from_pretrained(
            folder, quantization_config=config, dtype=parameter.dtype, device_map={"": parameter.device}
        )
    return quantized.eval()


def _qa_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget_rows: Dataset,
    retain_rows: Dataset | None,
    batch_size: int,
    max_length: int,
    objective: Objective | None,
    text_format: TextFormat | None = None,
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """`forget_metrics` on the forget rows and, under `retain_*` names, on the retain rows."""
    scoring = dict(objective=objective, text_format=text_format)
    summary, per_example = forget_metrics(model, tokenizer, forget_rows, batch_size, max_length, **scoring)
    if retain_rows is not None:
        retain, retain_per_example = forget_metrics(model, tokenizer, retain_rows, batch_size, max_length, **scoring)
        summary |= {m.replace("forget", "retain", 1): v for m, v in retain.items()}
        per_example |= {m.replace("forget", "retain", 1): v for m, v in retain_per_example.items()}
    return summary, per_example


def _share(part: float, whole: float) -> float:
    return part / whole if whole != 0 else math.nan


def quantization_report(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget_rows: Dataset,
    retain_rows: Dataset | None = None,
    bits: int | Sequence[int] = (8, 4),
    original: nn.Module | Mapping[str, float] | None = None,
    backend: str = "quanto",
    batch_size: int = 32,
    max_length: int = 512,
    objective: Objective | None = None,
    text_format: TextFormat | None = None,
) -> dict:
    """Forget (and retain) metrics of `model` at full precision and of its `quantized_copy` at each of `bits`, side
    by side: does quantisation undo the unlearning (Zhang et al. 2024, arXiv:2410.16454)?

    Metrics (module docstring): ``forget_prob``, ``forget_accuracy`` on `forget_rows` and, given `retain_rows`,
    ``retain_prob``, ``retain_accuracy`` (the same two measures on the retain rows: quantisation that undoes the
    unlearning and also breaks the model shows here).

    `original` is the model before unlearning (or its full-precision ``{"forget_prob": ..., "forget_accuracy":
    ...}`` on the same forget rows). With it, for each forget metric m, with o = the original's value, u = `model`'s
    at full precision and q = `model`'s at a quantised precision:

    - ``recovered`` = (q - u) / (o - u): the share of the unlearning (the drop o - u) that quantisation undoes;
      0 = none, 1 = all of it (back at the original's level), negative = quantisation deepened the forgetting;
      NaN when o == u (nothing was unlearned);
    - ``retained`` = m / o at every precision, full included: the share of the original's forget score the model
      keeps, the quantity behind the paper's summary (methods with utility constraints keep about 21% of the
      forgotten knowledge at full precision, about 83% after 4-bit quantisation); NaN when o == 0.

    Without `original` only ``difference`` (q - u, for every metric) measures the change. The rows are rendered by
    `text_format` (None = `TextFormat()`, the chat template when the tokenizer has one).

    Returns ``{"full": {metric: value}, "int8": {...}, "int4": {...}, "difference": {"int8": {metric: q - u}, ...},
    "recovered": {"int8": {forget metric: ...}, ...}, "retained": {"full": {...}, "int8": {...}, ...}, "original":
    {forget metric: o}, "per_example": {f"{metric}_{precision}": [...]}, "precisions": ["full", "int8", "int4"],
    "bits": [8, 4], "backend": backend}`` (``recovered``, ``retained`` and ``original`` only with `original`).
    """
    bits = _as_bits(bits)
    _check_rows(forget_rows, "The forget rows")
    if retain_rows is not None:
        _check_rows(retain_rows, "The retain rows")
    for b in bits:  # refuse an unavailable backend before any model is scored
        quantization_config(b, backend, next(model.parameters()).device)
    text_format = evaluation_format(text_format)
    check_qa_format(text_format, tokenizer, "The quantization report")
    if original is None:
        start = None
    elif isinstance(original, nn.Module):
        start, _ = forget_metrics(
            original, tokenizer, forget_rows, batch_size, max_length, objective=objective, text_format=text_format
        )
    else:
        missing = [m for m in METRICS if m not in original]
        if missing:
            raise ValueError(
                f"original needs the full-precision forget metrics {list(METRICS)} of the model before unlearning "
                f"(or the model itself); missing {missing}."
            )
        start = {m: float(original[m]) for m in METRICS}

    precisions = ["full"] + [f"int{b}" for b in bits]
    scoring = (tokenizer, forget_rows, retain_rows, batch_size, max_length, objective, text_format)
    scored = {"full": _qa_metrics(model, *scoring)}
    for b in bits:
        quantized = quantized_copy(model, b, backend)
        scored[f"int{b}"] = _qa_metrics(quantized, *scoring)
        del quantized
    full = scored["full"][0]
    report: dict = {p: scored[p][0] for p in precisions}
    report["difference"] = {p: {m: report[p][m] - full[m] for m in full} for p in precisions[1:]}
    if start is not None:
        report["original"] = start
        report["recovered"] = {
            p: {m: _share(report[p][m] - full[m], start[m] - full[m]) for m in METRICS} for p in precisions[1:]
        }
        report["retained"] = {p: {m: _share(report[p][m], start[m]) for m in METRICS} for p in precisions}
    report["per_example"] = {f"{m}_{p}": values for p in precisions for m, values in scored[p][1].items()}
    report.update(precisions=precisions, bits=list(bits), backend=backend)
    return report


@dataclass(eq=False, repr=False)
class QuantizationEvaluator(Evaluator):
    """`quantization_report` as an evaluator. Summary: ``{name}/{metric}_{precision}`` for every metric
    (``forget_prob``, ``forget_accuracy`` and, with `retain_rows`, ``retain_prob``, ``retain_accuracy``) and
    precision (``full``, ``int8``, ``int4``), and, with `original`, ``{name}/{forget metric}_{precision}_recovered``
    for the quantised precisions. Per-example: ``{name}/{metric}_{precision}`` for every metric and precision. Meta:
    bits, backend, the original's numbers and the definition of recovery. The check needs no reference run.
    `text_format` renders the rows (the trainer's; None = `TextFormat()`)."""

    forget_rows: Dataset
    bits: int | Sequence[int] = (8, 4)
    retain_rows: Dataset | None = None
    original: nn.Module | Mapping[str, float] | None = None
    backend: str = "quanto"
    name: str = "quant"
    objective: Objective = field(default_factory=CausalLMObjective)
    text_format: TextFormat | None = None

    def __post_init__(self) -> None:
        self.text_format = evaluation_format(self.text_format)
        self.bits = _as_bits(self.bits)
        if self.backend not in QUANT_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(QUANT_BACKENDS)}; got {self.backend!r}")

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        options = dict(bits=self.bits, original=self.original, backend=self.backend, objective=self.objective)
        options["text_format"] = self.text_format
        out = quantization_report(model, tokenizer, self.forget_rows, self.retain_rows, **options)
        summary = {f"{self.name}/{m}_{p}": v for p in out["precisions"] for m, v in out[p].items()}
        for p, values in out.get("recovered", {}).items():
            summary |= {f"{self.name}/{m}_{p}_recovered": v for m, v in values.items()}
        per_example = {f"{self.name}/{key}": values for key, values in out["per_example"].items()}
        meta = {
            self.name: {
                "bits": list(self.bits),
                "backend": self.backend,
                "original": out.get("original"),
                "recovered": "(quantised - full) / (original - full), forget metrics at full precision",
            },
            "text_format": self.text_format.describe(tokenizer),
        }
        return EvaluationResult(summary, per_example, meta)
