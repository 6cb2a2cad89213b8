"""Robustness of unlearning: does the forgotten knowledge come back after a little fine-tuning or after quantisation?

Two attacks on a COPY of the unlearned model (the caller's model is never modified):

- Relearning (Lynch et al. 2024, "Eight Methods to Evaluate Robust Unlearning in LLMs", arXiv:2402.16835, Sec. on
  relearning; Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks",
  arXiv:2406.13356): fine-tune the copy for a few optimizer steps on a small part of the forget set and measure the
  forget metrics on the *rest* of it. Knowledge that was only suppressed comes back on rows never relearned.
- Quantisation (Zhang et al. 2024, "Catastrophic Failure of LLM Unlearning via Quantization", arXiv:2410.16454):
  quantise the copy's Linear weights and measure the forget metrics again; a small weight update that hides the
  knowledge at full precision can round away.

The forget metrics, both from one batched teacher-forced pass (`scoring.token_stats`, QA layout: prompt masked, EOS
appended and scored):

- forget probability: per example P = exp(-mean NLL of its answer tokens) (TOFU's length-normalised probability,
  Maini et al. 2024, arXiv:2401.06121), averaged over examples;
- forget accuracy: per example the exact memorization EM = (1/T) sum_t [argmax_z p(z | y_<t) == y_t] over its T
  answer tokens (Tirumala et al. 2022, arXiv:2205.10770), averaged over examples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from datasets import Dataset
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.collator import QACollator
from .memorization import exact_memorization
from .result import EvaluationResult
from .scoring import TokenStats, qa_batches, token_stats

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
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """`forget_stats_metrics` of `model` on QA `rows` (columns `question`, `answer`), one batched no-grad pass."""
    _check_rows(rows, "The forget rows")
    batches = qa_batches(tokenizer, rows["question"], rows["answer"], batch_size=batch_size, max_length=max_length)
    stats = token_stats(model, batches, desc=desc)
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
) -> dict:
    """Relearning attack (Lynch et al. 2024, arXiv:2402.16835; Hu et al. 2024, arXiv:2406.13356).

    A deep copy of `model` (`attack_copy`; every parameter trainable) is fine-tuned for `steps` AdamW steps on
    `relearn_rows` (plain mean NLL of the answer tokens in the `QACollator` layout, shuffled mini-batches of
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

    before = forget_metrics(model, tokenizer, eval_rows, eval_batch_size, max_length)

    attacked = attack_copy(model)
    attacked.requires_grad_(True)
    attacked.train()
    device = next(attacked.parameters()).device
    optimizer = torch.optim.AdamW(attacked.parameters(), lr=learning_rate, weight_decay=weight_decay)
    collator = QACollator(tokenizer, max_length=max_length)
    rows = [{"question": q, "answer": a} for q, a in zip(relearn_rows["question"], relearn_rows["answer"])]
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    batches = _batches_forever(rows, batch_size, generator)
    for _ in tqdm(range(steps), desc="relearning", leave=False):
        batch = {k: v.to(device) for k, v in collator(next(batches)).items()}
        loss = attacked(**batch).loss  # HF causal-LM loss: mean NLL over the tokens whose label is not -100
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Relearning loss became {loss.item()} at step {len(losses)}.")
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(attacked.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    attacked.eval()

    after = forget_metrics(attacked, tokenizer, eval_rows, eval_batch_size, max_length)
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


class RelearningEvaluator:
    """`relearning_attack` as an evaluator: summary `{name}/forget_prob_before`, `{name}/forget_prob_after`,
    `{name}/forget_accuracy_before`, `{name}/forget_accuracy_after` (and `..._recovered`), per-example
    `{name}/forget_prob_after` and `{name}/forget_accuracy_after` on `eval_rows`."""

    def __init__(
        self,
        relearn_rows: Dataset,
        eval_rows: Dataset,
        steps: int = 20,
        learning_rate: float = 1e-4,
        batch_size: int = 4,
        seed: int = 0,
        name: str = "relearn",
    ) -> None:
        self.relearn_rows = relearn_rows
        self.eval_rows = eval_rows
        self.steps = steps
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.seed = seed
        self.name = name

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """`reference` is unused (the attack needs no retain-model run); accepted for the evaluator interface."""
        out = relearning_attack(
            model,
            tokenizer,
            self.relearn_rows,
            self.eval_rows,
            steps=self.steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        summary = {}
        for metric in METRICS:
            for when in ("before", "after", "recovered"):
                summary[f"{self.name}/{metric}_{when}"] = out[when][metric]
        per_example = {f"{self.name}/{m}_after": out["per_example"][f"{m}_after"] for m in METRICS}
        meta = {
            self.name: {
                "steps": self.steps,
                "learning_rate": self.learning_rate,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "relearn_rows": len(self.relearn_rows),
                "eval_rows": len(self.eval_rows),
            }
        }
        return EvaluationResult(summary, per_example, meta)


def quantized_copy(model: nn.Module, bits: int = 8) -> nn.Module:
    """A copy of `model` whose `nn.Linear` layers hold int8 weights (per-tensor affine) with dynamic int8 activation
    quantisation: `torch.ao.quantization.quantize_dynamic` (PyTorch's built-in eager-mode quantisation, which
    PyTorch marks deprecated in favour of torchao). Embeddings and norms stay in float32.

    The copy (`attack_copy`: PEFT adapters merged) is cast to float32 and moved to the CPU, where these quantised
    kernels run. The caller's model is untouched. `bits=4` needs a library this build of PyTorch lacks (its dynamic
    quantisation is int8 only) and raises a RuntimeError naming what to install.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if bits == 4:
        raise RuntimeError(
            "4-bit weight quantisation is not available: torch.ao.quantization.quantize_dynamic supports only int8 "
            "(qint8) and float16. Install torchao (`pip install torchao`, int4 weight-only quantize_) or, on CUDA, "
            "bitsandbytes (`pip install bitsandbytes`, load_in_4bit); erasus_hf implements only the 8-bit path."
        )
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as error:
        raise RuntimeError(
            "torch.ao.quantization.quantize_dynamic is missing from this PyTorch; install torchao "
            "(`pip install torchao`) for int8 weight quantisation."
        ) from error
    clone = attack_copy(model).float().to("cpu").eval()
    return quantize_dynamic(clone, {nn.Linear}, dtype=torch.qint8, inplace=True)


def quantized_forget_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget_rows: Dataset,
    bits: int = 8,
    batch_size: int = 32,
    max_length: int = 512,
) -> dict:
    """Forget metrics (`forget_prob`, `forget_accuracy`) of `model` and of its `quantized_copy`, side by side
    (Zhang et al. 2024, arXiv:2410.16454): ``{"full": {...}, "quantized": {...}, "difference": {metric: quantized -
    full}, "bits": bits, "per_example": {"forget_prob_full": [...], "forget_prob_quantized": [...], ...}}``."""
    _check_rows(forget_rows, "The forget rows")
    quantized = quantized_copy(model, bits)
    full = forget_metrics(model, tokenizer, forget_rows, batch_size, max_length)
    quant = forget_metrics(quantized, tokenizer, forget_rows, batch_size, max_length)
    return {**side_by_side(("full", full), ("quantized", quant), change="difference"), "bits": bits}


class QuantizationEvaluator:
    """`quantized_forget_metrics` as an evaluator: summary `{name}/forget_prob_full`, `{name}/forget_prob_quantized`,
    `{name}/forget_accuracy_full`, `{name}/forget_accuracy_quantized`, per-example `{name}/forget_prob_quantized`."""

    def __init__(self, forget_rows: Dataset, bits: int = 8, name: str | None = None) -> None:
        self.forget_rows = forget_rows
        self.bits = bits
        self.name = name or f"quant{bits}"

    def evaluate(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, reference: EvaluationResult | None = None
    ) -> EvaluationResult:
        """`reference` is unused; accepted for the evaluator interface."""
        out = quantized_forget_metrics(model, tokenizer, self.forget_rows, bits=self.bits)
        summary = {}
        for metric in METRICS:
            for which in ("full", "quantized"):
                summary[f"{self.name}/{metric}_{which}"] = out[which][metric]
        per_example = {f"{self.name}/{m}_quantized": out["per_example"][f"{m}_quantized"] for m in METRICS}
        return EvaluationResult(summary, per_example, {self.name: {"bits": self.bits}})
