"""Unlearning against retraining, measured in one run on a tofu_mini preset.

Retraining: the retain model trained from scratch here (the same initialisation, settings and epochs as the
finetuned model, on the retain authors only), timed. Unlearning: every method of benchmarks/tofu_mini, LoRA and full
fine-tuning, from the finetuned model; forget quality (against the retrained model) after every epoch, and the
training seconds (evaluation excluded) until the epoch of the best one. The ratio retrain seconds / seconds to best
forget quality is the speed-up; the table shows the forget quality each method reaches with it.

    python -m benchmarks.efficiency_benchmark                      # preset small, 2 CPU cores
    python -m benchmarks.efficiency_benchmark --methods npo simnpo --modes lora

Writes benchmarks/results/efficiency_<preset>.{md,json}. The finetuned model comes from the tofu_mini cache (trained
there when missing); the retain model is always trained again, since its wall time is the measurement.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from .tofu_mini.__main__ import setup
from .tofu_mini.models import load_splits, train_model, trained_models
from .tofu_mini.protocol import evaluate, run_method
from .tofu_mini.report import environment


def best_point(trace: list[dict]) -> dict:
    """The first epoch reaching the highest forget quality of the run."""
    return max(trace, key=lambda p: (p["forget_quality"], -p["epoch"]))


def markdown(results: dict) -> str:
    env = results["environment"]
    retrain = results["retrain_seconds"]
    lines = [
        f"`{results['command']}` on {env['machine']} ({env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}; {results['seconds']:.0f} s in all.",
        "",
        f"Retraining the retain model from scratch: {retrain:.1f} s ({results['retrain_rows']} rows, "
        f"{results['preset']['sft_epochs']} epochs). Unlearning budget: {results['preset']['unlearn_epochs']} epochs "
        "over the forget set; forget quality measured after each.",
        "",
        "| method | mode | best FQ | at epoch | s to best FQ | speed-up vs retraining | final FQ | total s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        best = row["best"]
        lines.append(
            f"| {row['method']} | {row['mode']} | {best['forget_quality']:.2e} | {best['epoch']} | "
            f"{best['train_seconds']:.1f} | {retrain / best['train_seconds']:.0f}x | "
            f"{row['metrics']['forget_quality']:.2e} | {row['train_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args, preset, catalogue = setup(argv, prog="python -m benchmarks.efficiency_benchmark", description=__doc__)
    start = time.perf_counter()
    splits = load_splits(preset, args.data_dir)
    cached = trained_models(preset, splits, args.cache_dir, seed=args.seeds[0], quiet=args.quiet)
    tokenizer, finetuned = cached["tokenizer"], cached["finetuned"].to(args.device).eval()

    print(f"Retraining the retain model from scratch on {len(splits.train_retain)} rows (timed)...")
    retrained, retrain_seconds = train_model(preset, tokenizer, splits.train_retain, args.seeds[0], args.quiet)
    reference = evaluate(retrained.eval(), tokenizer, preset, splits, None)["raw"]

    rows = []
    for name in args.methods or catalogue:
        for mode in args.modes:
            row = run_method(
                catalogue[name], mode, finetuned, tokenizer, preset, splits, reference,
                device=args.device, seed=args.seeds[0], final_evaluation=False, quiet=args.quiet,
            )  # fmt: skip
            row["best"] = best_point(row["trace"])
            best = row["best"]
            print(
                f"{name:>12} {mode:<4} best FQ {best['forget_quality']:.2e} at epoch {best['epoch']} after "
                f"{best['train_seconds']:.1f} s: {retrain_seconds / best['train_seconds']:.0f}x faster than retraining"
            )
            rows.append(row)

    results = {
        "command": shlex.join(
            ["python", "-m", "benchmarks.efficiency_benchmark", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": environment(args.device),
        "preset": {"name": preset.name, "sft_epochs": preset.sft_epochs, "unlearn_epochs": preset.unlearn_epochs},
        "retrain_seconds": retrain_seconds,
        "retrain_rows": len(splits.train_retain),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"efficiency_{preset.name}.json").write_text(json.dumps(results, indent=2))
    (out / f"efficiency_{preset.name}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / f'efficiency_{preset.name}.md'} and .json")
    return results


if __name__ == "__main__":
    main()
