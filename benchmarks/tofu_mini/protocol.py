"""One benchmark run: unlearn with one method (LoRA or full fine-tune) from a copy of the finetuned model, timing the
training and its peak memory, then evaluate with the TOFU metrics and membership inference."""

from __future__ import annotations

import copy
import ctypes
import re
import tempfile
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

from erasus_hf import UnlearningTrainer
from erasus_hf.data.tofu import TOFUDataset
from erasus_hf.evaluation import EvaluationResult, MIAEvaluator, TOFUEvaluator
from erasus_hf.strategies import get_strategy

from .methods import Method, method_config
from .models import Splits
from .presets import Preset

MIA_ATTACKS = ("loss", "min_k_plus_plus")


class PeakMemory:
    """Peak memory of a block: `torch.cuda.max_memory_allocated` on GPU; on CPU the peak resident set (VmHWM) minus
    the resident set on entry, after returning the heap's free memory to the system (`malloc_trim`, so that memory
    freed by earlier runs is not reused unseen) and resetting the peak (`/proc/self/clear_refs`). Linux only."""

    def __init__(self, device: str) -> None:
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else self._status("VmHWM")
        self.mib = (peak - self.start) / 2**20


def evaluators(preset: Preset, splits: Splits) -> tuple[TOFUEvaluator, TOFUEvaluator, MIAEvaluator]:
    """The full TOFU evaluation (forget + retain, ROUGE included), the cheap forget-only one (truth ratios, no
    generation: forget quality after every epoch) and the MIA (forget = members, holdout = non-members)."""
    data = TOFUDataset(forget=splits.forget, retain=splits.retain_eval, forget_split=preset.forget_split)
    full = TOFUEvaluator(data, batch_size=preset.eval_batch_size, max_new_tokens=preset.max_new_tokens)
    forget_only = TOFUEvaluator(
        TOFUDataset(forget=splits.forget, forget_split=preset.forget_split),
        batch_size=preset.eval_batch_size,
        rouge=False,
    )
    mia = MIAEvaluator(
        splits.forget.select_columns(["question", "answer"]),
        splits.holdout,
        attacks=MIA_ATTACKS,
        batch_size=preset.eval_batch_size,
    )
    return full, forget_only, mia


def evaluate(model, tokenizer, preset: Preset, splits: Splits, reference: EvaluationResult | None) -> dict:
    """The table's metrics of one model (forget quality only with the retain model's `reference` evaluation)."""
    tofu, _, mia = evaluators(preset, splits)
    result = tofu.evaluate(model, tokenizer, reference=reference)
    summary = {k.removeprefix("tofu/"): v for k, v in result.summary.items()}
    summary.update({k.removeprefix("mia/"): v for k, v in mia.evaluate(model, tokenizer).summary.items()})
    return {"metrics": summary, "forget_truth_ratios": result.per_example["tofu/forget_truth_ratio"], "raw": result}


class ForgetQualityTrace(TrainerCallback):
    """Forget quality after every epoch, against the seconds of training so far (the evaluation time excluded)."""

    def __init__(self, evaluator: TOFUEvaluator, tokenizer, reference: EvaluationResult) -> None:
        self.evaluator, self.tokenizer, self.reference = evaluator, tokenizer, reference
        self.points: list[dict] = []
        self.eval_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        began = time.perf_counter()
        summary = self.evaluator.evaluate(model, self.tokenizer, reference=self.reference).summary
        self.points.append(
            {
                "epoch": round(state.epoch),
                "train_seconds": began - self.start - self.eval_seconds,
                "forget_quality": summary["tofu/forget_quality"],
            }
        )
        self.eval_seconds += time.perf_counter() - began


def run_method(
    method: Method,
    mode: str,
    finetuned,
    tokenizer,
    preset: Preset,
    splits: Splits,
    reference: EvaluationResult,
    device: str = "cpu",
    seed: int = 0,
    trace: bool = True,
    final_evaluation: bool = True,
    quiet: bool = True,
    after: Callable[[torch.nn.Module], dict] | None = None,
) -> dict:
    """Unlearn `splits.forget` from a copy of `finetuned` with `method` (`mode` "lora" or "full"); returns the
    settings, train seconds, peak memory, forget quality after every epoch (`trace`) and the metrics of the
    unlearned model (`final_evaluation`; without it only the last epoch's forget quality), the coreset the run
    trained on (`method.config`'s `coreset` options; without the kept indices) and `after(unlearned model)`."""
    one_shot = getattr(get_strategy(method.strategy, **method.kwargs), "one_shot", False)
    model = copy.deepcopy(finetuned).to(device)
    with tempfile.TemporaryDirectory() as output_dir:
        args = method_config(method, mode, preset, output_dir, seed, quiet, use_cpu=device == "cpu")
        learning_rate = args.learning_rate
        _, forget_only, _ = evaluators(preset, splits)
        tracer = ForgetQualityTrace(forget_only, tokenizer, reference) if trace and not one_shot else None
        with PeakMemory(device) as memory:
            start = time.perf_counter()
            trainer = UnlearningTrainer(
                model,
                args,
                forget_dataset=splits.forget.select_columns(["question", "answer"]),
                retain_dataset=splits.train_retain if method.retain_loss != "none" else None,
                processing_class=tokenizer,
                callbacks=[tracer] if tracer else None,
            )
            trainer.train()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start - (tracer.eval_seconds if tracer else 0.0)
        unlearned = trainer.model.eval()
        evaluation = evaluate(unlearned, tokenizer, preset, splits, reference)
        extra = after(unlearned) if after is not None else None
    points = tracer.points if tracer else []
    if trace and one_shot:  # no epochs to trace: the one edit at the end is the only point
        points = [
            {
                "epoch": args.num_train_epochs,
                "train_seconds": seconds,
                "forget_quality": evaluation["metrics"]["forget_quality"],
            }
        ]
    return {
        "method": method.strategy,
        "mode": mode,
        "learning_rate": learning_rate,
        "num_train_epochs": args.num_train_epochs,
        "seed": seed,
        "strategy_kwargs": method.kwargs,
        "retain_loss": method.retain_loss,
        "reference": trainer.reference_mode,
        "train_seconds": seconds,
        "peak_mib": memory.mib,
        "metrics": evaluation["metrics"],
        "forget_truth_ratios": evaluation["forget_truth_ratios"],
        "trace": points,
        "coreset": _without_indices(trainer.coreset.to_dict()) if trainer.coreset is not None else None,
        "after": extra,
    }


def _without_indices(report: dict) -> dict:
    return {**report, "sides": {k: {f: v for f, v in s.items() if f != "indices"} for k, s in report["sides"].items()}}
