"""TOFU from scratch: train a finetuned and a retain model on real TOFU authors, run every LLM strategy of the
catalogue with LoRA and with full fine-tuning from its recipe (`trainers/recipes/tofu_mini/`), with 3 seeds, and
evaluate each with the TOFU metrics and membership inference.

    python -m benchmarks.tofu_mini                          # preset small: 2 CPU cores, about 40 minutes
    python -m benchmarks.tofu_mini --preset small_forget05 --methods ce_u wga
    python -m benchmarks.tofu_mini --preset large --device cuda
    python -m benchmarks.tofu_mini --methods npo simnpo --modes lora --seeds 0

Writes benchmarks/results/tofu_mini_<preset>.{md,json,png}: per method and mode the mean and standard deviation over
the seeds (the seed sets the unlearning run's data order, pairing and adapter initialisation; the finetuned and
retain models are trained once, with seed 0, and cached under --cache_dir while the preset and the data are
unchanged). See benchmarks/tofu_mini/README.md for how this differs from TOFU as published.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import torch
import transformers

from erasus_hf.evaluation.tofu import forget_ks_statistic, forget_quality

from .methods import RECIPE_DIR, Method, methods, recipes
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="unlearning seeds (default: 0 1 2)")
    parser.add_argument("--recipes", default=str(RECIPE_DIR), help="the folder of <method>_<mode>.yaml recipes")
    parser.add_argument("--retrain", action="store_true", help="train the finetuned and retain models again")
    parser.add_argument(
        "--update",
        action="store_true",
        help="keep the rows of the existing results of this preset (same seeds) for the methods and modes not run "
        "now, and replace the ones run: a table built in several runs",
    )
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


def selected_recipes(args: argparse.Namespace, preset: Preset, catalogue: dict[str, Method]) -> dict:
    """The recipes of --methods x --modes, in the catalogue's order; a missing recipe is refused before any run."""
    found = recipes(preset.model.num_layers, args.recipes)
    wanted = [(name, mode) for name in (args.methods or catalogue) for mode in args.modes]
    missing = [f"{name}_{mode}.yaml" for name, mode in wanted if (name, mode) not in found]
    if missing:
        raise SystemExit(
            f"No recipe in {args.recipes} for {missing}; write one with `python -m benchmarks.tofu_mini.tune`."
        )
    return {key: found[key] for key in wanted}


def aggregate(runs: list[dict]) -> dict:
    """One table row from the runs of one method and mode over the seeds: the mean and the (sample) standard
    deviation of every metric, of the best-epoch forget quality, the train seconds and the peak memory."""
    first = runs[0]
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in run["metrics"].items():
            values.setdefault(key, []).append(value)
        values.setdefault("best_epoch_forget_quality", []).append(
            max((p["forget_quality"] for p in run["trace"]), default=float("nan"))
        )
        values.setdefault("train_seconds", []).append(run["train_seconds"])
        values.setdefault("peak_mib", []).append(run["peak_mib"])
    return {
        **{k: first[k] for k in ("method", "mode", "learning_rate", "num_train_epochs", "strategy_kwargs")},
        **{k: first[k] for k in ("retain_loss", "reference")},
        "seeds": [run["seed"] for run in runs],
        "metrics": {k: statistics.fmean(v) for k, v in values.items()},
        "std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in values.items()},
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    args, preset, catalogue = setup(argv)
    start = time.perf_counter()
    splits = load_splits(preset, args.data_dir)
    trained = trained_models(preset, splits, args.cache_dir, quiet=args.quiet, retrain=args.retrain)
    tokenizer = trained["tokenizer"]
    finetuned, retain = (trained[name].to(args.device).eval() for name in ("finetuned", "retain"))

    print("Evaluating the retain model (the reference of forget quality) and the finetuned model...")
    reference = evaluate(retain, tokenizer, preset, splits, None)
    ratios = reference["forget_truth_ratios"]
    reference["metrics"]["forget_quality"] = forget_quality(ratios, ratios)  # 1: the reference against itself
    reference["metrics"]["forget_ks_statistic"] = forget_ks_statistic(ratios, ratios)  # 0
    finetuned_metrics = evaluate(finetuned, tokenizer, preset, splits, reference["raw"])["metrics"]
    rows = [
        {"method": "retain model", "metrics": reference["metrics"]},
        {"method": "finetuned", "metrics": finetuned_metrics},
    ]
    for (name, mode), method in selected_recipes(args, preset, catalogue).items():
        runs = []
        for seed in args.seeds:
            run = run_method(
                method,
                mode,
                finetuned,
                tokenizer,
                preset,
                splits,
                reference["raw"],
                device=args.device,
                seed=seed,
                quiet=args.quiet,
            )
            del run["forget_truth_ratios"]
            runs.append(run)
        row = aggregate(runs)
        m, sd = row["metrics"], row["std"]
        print(
            f"{name:>12} {mode:<4} FQ {m['forget_quality']:.2e} ± {sd['forget_quality']:.1e}  KS "
            f"{m['forget_ks_statistic']:.3f}  MU {m['model_utility']:.3f} ± {sd['model_utility']:.3f}  forget ROUGE "
            f"{m['forget_rouge']:.3f}  {m['train_seconds']:.1f} s  {m['peak_mib']:.0f} MiB",
            flush=True,
        )
        rows.append(row)

    command = shlex.join(["python", "-m", "benchmarks.tofu_mini", *(argv if argv is not None else sys.argv[1:])])
    seconds = time.perf_counter() - start
    if args.update:
        rows, command, seconds = updated(args, preset, rows, command, seconds)
    results = {
        "command": command,
        "environment": environment(args.device),
        "seeds": args.seeds,
        "preset": {
            **asdict(preset),
            "retain_authors": list(preset.retain_authors)[:: len(preset.retain_authors) - 1],
            "holdout_authors": list(preset.holdout_authors)[:: len(preset.holdout_authors) - 1],
            "tuning_authors": list(preset.tuning_authors) if preset.tuning_authors else None,
        },
        "models": {k: v for k, v in trained["meta"].items() if k != "key"},
        "reference_forget_truth_ratios": reference["forget_truth_ratios"],
        "rows": rows,
        "seconds": seconds,
    }
    for path in write(results, args.out_dir, f"tofu_mini_{preset.name}"):
        print(f"wrote {path}")
    return results


def updated(args: argparse.Namespace, preset: Preset, rows: list[dict], command: str, seconds: float):
    """`rows` (the reference models first, then the runs of now) merged into the existing results of the preset:
    the runs of now replace the same method and mode, the others stay; commands and seconds add up."""
    path = Path(args.out_dir) / f"tofu_mini_{preset.name}.json"
    if not path.is_file():
        return rows, command, seconds
    previous = json.loads(path.read_text())
    if previous.get("seeds") != args.seeds:
        raise SystemExit(f"--update: {path} has seeds {previous.get('seeds')}, this run {args.seeds}.")
    now = {(r["method"], r.get("mode")): r for r in rows}
    merged = [now.pop((r["method"], r.get("mode")), r) for r in previous["rows"]]
    return merged + list(now.values()), f"{previous['command']}; {command}", previous["seconds"] + seconds


if __name__ == "__main__":
    main()
