"""TOFU from scratch: train a finetuned and a retain model on real TOFU authors, run every LLM strategy of the
catalogue with LoRA and with full fine-tuning, and evaluate each with the TOFU metrics and membership inference.

    python -m benchmarks.tofu_mini                          # preset small: 2 CPU cores, under 30 minutes
    python -m benchmarks.tofu_mini --preset large --device cuda
    python -m benchmarks.tofu_mini --methods npo simnpo --modes lora

Writes benchmarks/results/tofu_mini_<preset>.{md,json,png}. The finetuned and retain models are cached under
--cache_dir and reused while the preset and the data are unchanged. See benchmarks/tofu_mini/README.md for how
this differs from TOFU as published.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import asdict

import datasets
import torch
import transformers

from erasus_hf.evaluation.tofu import forget_quality

from .methods import Method, methods
from .models import add_data_options, load_splits, trained_models
from .presets import PRESETS, Preset
from .protocol import evaluate, run_method
from .report import environment, write


def parse_args(
    argv: list[str] | None = None, prog: str = "python -m benchmarks.tofu_mini", description: str = __doc__
) -> argparse.Namespace:
    """The benchmark's options (shared by `benchmarks.efficiency_benchmark`, which passes its own name and text)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=list(PRESETS), help="benchmark size (default: small)")
    parser.add_argument("--methods", nargs="+", help="strategies to run (default: every one in methods.py)")
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    add_data_options(parser)
    parser.add_argument("--out_dir", default="benchmarks/results", help="where the table, JSON and plot go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train the finetuned and retain models again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def setup(argv: list[str] | None = None, **parser_text: str) -> tuple[argparse.Namespace, Preset, dict[str, Method]]:
    """Parse the options, silence the progress bars with --quiet, and check --methods against the catalogue."""
    args = parse_args(argv, **parser_text)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    preset = PRESETS[args.preset]
    catalogue = methods(preset.model.num_layers)
    unknown = sorted(set(args.methods or []) - set(catalogue))
    if unknown:
        raise SystemExit(f"Unknown method(s) {unknown}; the benchmark runs {sorted(catalogue)}.")
    return args, preset, catalogue


def main(argv: list[str] | None = None) -> dict:
    args, preset, catalogue = setup(argv)
    start = time.perf_counter()
    splits = load_splits(preset, args.data_dir)
    trained = trained_models(preset, splits, args.cache_dir, seed=args.seed, quiet=args.quiet, retrain=args.retrain)
    tokenizer = trained["tokenizer"]
    finetuned, retain = (trained[name].to(args.device).eval() for name in ("finetuned", "retain"))

    print("Evaluating the retain model (the reference of forget quality) and the finetuned model...")
    reference = evaluate(retain, tokenizer, preset, splits, None)
    ratios = reference["forget_truth_ratios"]
    reference["metrics"]["forget_quality"] = forget_quality(ratios, ratios)  # 1: the reference against itself
    finetuned_metrics = evaluate(finetuned, tokenizer, preset, splits, reference["raw"])["metrics"]
    rows = [
        {"method": "retain model", "metrics": reference["metrics"]},
        {"method": "finetuned", "metrics": finetuned_metrics},
    ]
    for name in args.methods or catalogue:
        for mode in args.modes:
            row = run_method(
                catalogue[name],
                mode,
                finetuned,
                tokenizer,
                preset,
                splits,
                reference["raw"],
                device=args.device,
                seed=args.seed,
                quiet=args.quiet,
            )
            m, best = row["metrics"], max(point["forget_quality"] for point in row["trace"])
            print(
                f"{name:>12} {mode:<4} FQ {m['forget_quality']:.2e} (best epoch: {best:.2e})  MU "
                f"{m['model_utility']:.3f}  forget ROUGE {m['forget_rouge']:.3f}  {row['train_seconds']:.1f} s  "
                f"{row['peak_mib']:.0f} MiB"
            )
            rows.append(row)

    results = {
        "command": shlex.join(["python", "-m", "benchmarks.tofu_mini", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(args.device),
        "preset": {
            **asdict(preset),
            "retain_authors": list(preset.retain_authors)[:: len(preset.retain_authors) - 1],
            "holdout_authors": list(preset.holdout_authors)[:: len(preset.holdout_authors) - 1],
        },
        "models": {k: v for k, v in trained["meta"].items() if k != "key"},
        "reference_forget_truth_ratios": reference["forget_truth_ratios"],
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    for path in write(results, args.out_dir, f"tofu_mini_{preset.name}"):
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
