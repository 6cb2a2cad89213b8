"""Coresets on TOFU-mini, measured against random: unlearn with a fraction of the forget or the retain rows, chosen
by each selector of `erasus_hf.coresets`, and compare forget quality, model utility, membership inference,
relearning and time with the full sets.

    python -m benchmarks.coresets                             # preset small, ce_u and wga with LoRA, 3 seeds
    python -m benchmarks.coresets --methods ce_u --seeds 0 --fractions 0.1 --sides retain   # one slice

Grid: every selector that serves the side (random, herding, k_center, kmeans, facility_location, loss,
gradient_norm, and forget_similar on the retain side, upcore on the forget side) x fractions x sides x methods x
seeds, plus the full sets (fraction 1) per method and seed. Each run is `benchmarks.tofu_mini.protocol.run_method`
with the method's tofu_mini settings and the coreset options (`UnlearningConfig(coreset=..., coreset_side=...,
coreset_fraction=...)`; a forget coreset trains for the full forget set's optimizer steps, the default
`coreset_budget="steps"`). The seed sets the run's data order, the adapter's initialisation and the random and
k-means draws; the finetuned and retain models are the cached tofu_mini ones (seed 0). Metrics are measured on the
*whole* forget set (40 rows) whatever the coreset. Relearning: 8 AdamW steps at lr 1e-3 on the forget set's even
rows, the exact-match forget accuracy then measured on its odd rows (`relearning_attack`).

Runs go to --workers processes (one torch thread each). Writes benchmarks/results/coresets_<preset>.{md,json,png}.
The default grid (390 runs) took 53 minutes on 2 CPU cores with the TOFU-mini models cached; training them first adds
about 26 minutes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import datasets
import torch
import transformers
from tqdm.auto import tqdm

from erasus_hf.coresets import SELECTORS
from erasus_hf.evaluation.robustness import relearning_attack
from erasus_hf.evaluation.tofu import forget_quality

from .tofu_mini.methods import methods
from .tofu_mini.models import add_data_options, load_splits, trained_models
from .tofu_mini.presets import PRESETS
from .tofu_mini.protocol import evaluate, run_method
from .tofu_mini.report import environment

METHODS = ("ce_u", "wga")
"""The two strongest runs of tofu_mini_small.md, both with LoRA: forget quality 0.77 at model utility 0.73."""
FRACTIONS = (0.05, 0.1, 0.25, 0.5)
RELEARN = dict(steps=8, learning_rate=1e-3, batch_size=4)
METRICS = (
    ("forget_quality", "FQ", "{:.2g}"),
    ("model_utility", "MU", "{:.3f}"),
    ("loss_auc", "MIA AUC", "{:.3f}"),
    ("relearned_accuracy", "relearned acc", "{:.3f}"),
    ("select_seconds", "select s", "{:.1f}"),
    ("unlearn_seconds", "unlearn s", "{:.1f}"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coresets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=list(PRESETS), help="tofu_mini preset (default: small)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS), help="besides 1 (full sets)")
    parser.add_argument("--sides", nargs="+", default=["retain", "forget"], choices=["retain", "forget"])
    parser.add_argument("--selectors", nargs="+", default=list(SELECTORS), help="default: every registered one")
    parser.add_argument("--workers", type=int, default=2, help="processes running runs side by side (default 2)")
    add_data_options(parser)
    parser.add_argument("--out_dir", default="benchmarks/results", help="where the table, JSON and plot go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars but the runs'")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(methods(2))) + sorted(set(args.selectors) - set(SELECTORS))
    if unknown:
        parser.error(f"unknown method(s) or selector(s) {unknown}")
    if not all(0 < f < 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1); the full sets (1) always run")
    return args


def jobs(args: argparse.Namespace) -> list[dict]:
    """Every run of the grid: the full sets, then side x selector x fraction, for each method and seed."""
    out = []
    for method in args.methods:
        for seed in args.seeds:
            out.append({"method": method, "side": "full", "selector": "full set", "fraction": 1.0, "seed": seed})
            for side in args.sides:
                for name in args.selectors:
                    if side not in SELECTORS[name].sides:
                        continue
                    for fraction in args.fractions:
                        out.append(
                            {"method": method, "side": side, "selector": name, "fraction": fraction, "seed": seed}
                        )
    return out


_STATE: dict = {}


def _start_worker(preset_name: str, data_dir: str | None, cache_dir: str, reference, mode: str) -> None:
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    preset = PRESETS[preset_name]
    splits = load_splits(preset, data_dir)
    trained = trained_models(preset, splits, cache_dir, quiet=True)
    _STATE.update(preset=preset, splits=splits, trained=trained, reference=reference, mode=mode)


def _run(job: dict) -> dict:
    preset, splits, trained = _STATE["preset"], _STATE["splits"], _STATE["trained"]
    method = methods(preset.model.num_layers)[job["method"]]
    if job["side"] != "full":
        coreset = {"coreset": job["selector"], "coreset_side": job["side"], "coreset_fraction": job["fraction"]}
        method = replace(method, config={**method.config, **coreset})
    forget = splits.forget.select_columns(["question", "answer"])
    relearn_rows, eval_rows = forget.select(range(0, len(forget), 2)), forget.select(range(1, len(forget), 2))

    def relearn(model) -> dict:
        result = relearning_attack(
            model, trained["tokenizer"], relearn_rows, eval_rows, seed=job["seed"], eval_batch_size=32, **RELEARN
        )
        return {"before": result["before"]["forget_accuracy"], "after": result["after"]["forget_accuracy"]}

    row = run_method(
        method,
        _STATE["mode"],
        trained["finetuned"].eval(),
        trained["tokenizer"],
        preset,
        splits,
        _STATE["reference"],
        seed=job["seed"],
        trace=False,
        after=relearn,
    )
    sides = (row["coreset"] or {}).get("sides", {})
    selected = sum(s["seconds"] for s in sides.values())
    return {
        **job,
        "metrics": {
            **{k: row["metrics"][k] for k in ("forget_quality", "model_utility", "loss_auc", "forget_rouge")},
            "relearned_accuracy": row["after"]["after"],
            "accuracy_before_relearning": row["after"]["before"],
            "select_seconds": selected,
            "unlearn_seconds": row["train_seconds"] - selected,
        },
        "kept": {side: s["kept"] for side, s in sides.items()},
        "max_steps": (row["coreset"] or {}).get("max_steps"),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation (over seeds) of every metric, per method, side, selector and fraction."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["side"], run["selector"], run["fraction"]), []).append(run)
    rows = []
    for (method, side, selector, fraction), members in groups.items():
        row = {"method": method, "side": side, "selector": selector, "fraction": fraction, "seeds": len(members)}
        for key, _, _ in METRICS:
            values = [m["metrics"][key] for m in members]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        row["kept"] = members[0]["kept"]
        rows.append(row)
    return rows


def _cell(stat: dict, fmt: str) -> str:
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def markdown(results: dict) -> str:
    env, rows = results["environment"], results["summary"]
    head = (
        f"`{results['command']}` on {env['machine']} ({results['workers']} processes, 1 torch thread each), torch "
        f"{env['torch']}, transformers {env['transformers']}, erasus_hf {env['erasus_hf']}; "
        f"{results['seconds']:.0f} s in all ({len(results['runs'])} runs).\n\n"
        f"Preset `{results['preset']['name']}`: forget `{results['preset']['forget_split']}` "
        f"({results['forget_rows']} rows), retain set {results['retain_rows']} rows; methods "
        f"{', '.join(results['methods'])} ({results['mode']}) at their tofu_mini settings; seeds "
        f"{results['seeds']}. Each cell: mean ± standard deviation over the seeds. FQ, MU and MIA AUC are measured "
        "on the whole forget set; relearned acc: forget accuracy on the odd forget rows after 8 steps on the even "
        "ones "
        f"(before relearning the finetuned model's is {results['finetuned']['accuracy']:.3f}); a forget coreset "
        "trains for the full set's optimizer steps.\n"
    )
    lines = [head]
    for method in results["methods"]:
        for side in ("retain", "forget"):
            block = [r for r in rows if r["method"] == method and r["side"] in (side, "full")]
            if len(block) < 2:
                continue
            lines.append(f"\n### {method}: {side} coreset\n")
            lines.append("| selector | fraction | kept | " + " | ".join(c for _, c, _ in METRICS) + " |")
            lines.append("|---|---|---|" + "---|" * len(METRICS))
            for r in sorted(
                block, key=lambda r: (r["fraction"] < 1, r["selector"] != "random", r["selector"], r["fraction"])
            ):
                kept = r["kept"].get(side, "all")
                cells = " | ".join(_cell(r[k], f) for k, _, f in METRICS)
                lines.append(f"| {r['selector']} | {r['fraction']:g} | {kept} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in ("retain", "forget") if any(r["side"] == s for r in results["summary"])]
    fig, axes = plt.subplots(
        2 * len(results["methods"]),
        len(sides),
        figsize=(6.5 * len(sides), 3.2 * 2 * len(results["methods"])),
        squeeze=False,
    )
    for i, method in enumerate(results["methods"]):
        full = next(r for r in results["summary"] if r["method"] == method and r["side"] == "full")
        for j, side in enumerate(sides):
            for k, (metric, label) in enumerate((("forget_quality", "forget quality"), ("model_utility", "MU"))):
                ax = axes[2 * i + k][j]
                selectors = sorted({r["selector"] for r in results["summary"] if r["side"] == side})
                for name in selectors:
                    points = sorted(
                        (
                            r
                            for r in results["summary"]
                            if r["method"] == method and r["side"] == side and r["selector"] == name
                        ),
                        key=lambda r: r["fraction"],
                    ) + [full]
                    xs = [p["fraction"] for p in points]
                    ax.errorbar(
                        xs,
                        [p[metric]["mean"] for p in points],
                        yerr=[p[metric]["std"] for p in points],
                        marker="o",
                        markersize=3,
                        capsize=2,
                        label=name,
                        linewidth=2.5 if name == "random" else 1,
                        color="black" if name == "random" else None,
                    )
                ax.set_xscale("log")
                ax.set_xticks([0.05, 0.1, 0.25, 0.5, 1.0], ["5%", "10%", "25%", "50%", "100%"])
                ax.set_title(f"{method}, {side} coreset: {label}", fontsize=9)
                ax.grid(alpha=0.3)
                if i == 0 and k == 0:
                    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    preset = PRESETS[args.preset]
    splits = load_splits(preset, args.data_dir)
    trained = trained_models(preset, splits, args.cache_dir, quiet=args.quiet)  # trains and caches them once
    tokenizer = trained["tokenizer"]
    print("Evaluating the retain model (the reference of forget quality) and the finetuned model...")
    reference = evaluate(trained["retain"].eval(), tokenizer, preset, splits, None)
    finetuned = evaluate(trained["finetuned"].eval(), tokenizer, preset, splits, reference["raw"])["metrics"]
    ratios = reference["forget_truth_ratios"]
    reference_metrics = {**reference["metrics"], "forget_quality": forget_quality(ratios, ratios)}
    forget = splits.forget.select_columns(["question", "answer"])
    before = relearning_attack(
        trained["finetuned"],
        tokenizer,
        forget.select(range(0, len(forget), 2)),
        forget.select(range(1, len(forget), 2)),
        seed=0,
        **RELEARN,
    )["before"]["forget_accuracy"]

    grid = jobs(args)
    runs = []
    context = multiprocessing.get_context("spawn")
    initargs = (args.preset, args.data_dir, args.cache_dir, reference["raw"], args.mode)
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_start_worker, initargs=initargs) as pool:
        futures = [pool.submit(_run, job) for job in grid]
        for future in tqdm(as_completed(futures), total=len(futures), desc="Coreset runs"):
            run = future.result()
            runs.append(run)
            m = run["metrics"]
            tqdm.write(
                f"{run['method']:>5} {run['side']:>6} {run['selector']:>17} {run['fraction']:<4g} seed {run['seed']}: "
                f"FQ {m['forget_quality']:.3f} MU {m['model_utility']:.3f} AUC {m['loss_auc']:.3f} "
                f"relearned {m['relearned_accuracy']:.3f} ({m['select_seconds']:.1f} + {m['unlearn_seconds']:.1f} s)"
            )
    runs.sort(key=lambda r: (r["method"], r["side"], r["selector"], r["fraction"], r["seed"]))
    results = {
        "command": shlex.join(["python", "-m", "benchmarks.coresets", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {**environment("cpu"), "threads": 1},
        "workers": args.workers,
        "preset": {
            **asdict(preset),
            "retain_authors": [preset.retain_authors.start, preset.retain_authors.stop - 1],
            "holdout_authors": [preset.holdout_authors.start, preset.holdout_authors.stop - 1],
        },
        "methods": args.methods,
        "mode": args.mode,
        "seeds": args.seeds,
        "relearning": RELEARN,
        "forget_rows": len(splits.forget),
        "retain_rows": len(splits.train_retain),
        "retain_model": reference_metrics,
        "finetuned": {**finetuned, "accuracy": before},
        "models": {k: v for k, v in trained["meta"].items() if k != "key"},
        "runs": runs,
        "summary": summarise(runs),
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"coresets_{preset.name}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))
    for suffix in (".md", ".json", ".png"):
        print(f"wrote {stem.with_suffix(suffix)}")
    return results


if __name__ == "__main__":
    main()
