"""The results as a Markdown table, a JSON file and a scatter plot (forget quality against model utility)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import transformers

import erasus_hf

COLUMNS = (
    ("forget_quality", "FQ", "{:.2e}"),
    ("forget_ks_statistic", "KS D", "{:.3f}"),
    ("model_utility", "MU", "{:.3f}"),
    ("forget_truth_ratio", "forget TR", "{:.3f}"),
    ("forget_prob", "forget P", "{:.3f}"),
    ("forget_rouge", "forget ROUGE", "{:.3f}"),
    ("retain_prob", "retain P", "{:.3f}"),
    ("retain_rouge", "retain ROUGE", "{:.3f}"),
    ("loss_auc", "MIA LOSS", "{:.3f}"),
    ("min_k_plus_plus_auc", "MIA Min-K%++", "{:.3f}"),
    ("best_epoch_forget_quality", "best-epoch FQ", "{:.2e}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("peak_mib", "peak MiB", "{:.0f}"),
)
"""(metric, header, format): every cell is the mean over the seeds, ± the standard deviation where there are
several; forget quality's spread is shown with one significant digit."""


def environment(device: str) -> dict:
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}"
    return {
        "machine": machine,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "erasus_hf": erasus_hf.__version__,
    }


def _cell(row: dict, key: str, fmt: str) -> str:
    if key not in row["metrics"]:
        return "-"
    mean = fmt.format(row["metrics"][key])
    spread = row.get("std", {}).get(key)
    if spread is None or len(row.get("seeds", [])) < 2:
        return mean
    return f"{mean} ± {spread:.0e}" if "e" in fmt else f"{mean} ± {fmt.format(spread)}"


def finetuned_utility(results: dict) -> float | None:
    return next((r["metrics"]["model_utility"] for r in results["rows"] if r["method"] == "finetuned"), None)


def markdown(results: dict) -> str:
    env, preset = results["environment"], results["preset"]
    seeds = results.get("seeds", [])
    lines = [
        f"`{results['command']}` on {env['machine']} ({env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, erasus_hf {env['erasus_hf']}; {results['seconds']:.0f} s in all.",
        "",
        f"Preset `{preset['name']}`: {results['models']['parameters'] / 1e6:.2f}M-parameter Llama; "
        f"{results['models']['finetuned_train_rows']} training rows (finetuned), "
        f"{results['models']['retain_train_rows']} (retain); forget `{preset['forget_split']}`; batch "
        f"{preset['batch_size']}; recipes of `trainers/recipes/tofu_mini/`; mean ± standard deviation over seeds "
        f"{', '.join(map(str, seeds))}. MU/ft = model utility over the finetuned model's.",
        "",
        "| model | mode | lr | epochs | "
        + " | ".join(c[1] for c in COLUMNS[:3])
        + " | MU/ft | "
        + " | ".join(c[1] for c in COLUMNS[3:])
        + " |",
        "|---" * (len(COLUMNS) + 5) + "|",
    ]
    finetuned = finetuned_utility(results)
    for row in results["rows"]:
        cells = [_cell(row, key, fmt) for key, _, fmt in COLUMNS]
        ratio = f"{row['metrics']['model_utility'] / finetuned:.3f}" if finetuned else "-"
        cells.insert(3, ratio)
        lr = f"{row['learning_rate']:.1e}" if "learning_rate" in row else "-"
        epochs = f"{row['num_train_epochs']:g}" if "num_train_epochs" in row else "-"
        lines.append(f"| {row['method']} | {row.get('mode', '-')} | {lr} | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter(results: dict, path: Path) -> None:
    """Forget quality (log) against model utility, each method and mode a marker with its seeds' spread as error
    bars, named in a legend (colour = method, filled circle = LoRA, square = full); the right panel zooms on the
    methods that keep at least 0.85 of the finetuned model's utility, where they cluster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finetuned = finetuned_utility(results)
    methods = sorted({r["method"] for r in results["rows"] if "mode" in r})
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax in axes:
        for row in results["rows"]:
            m, sd = row["metrics"], row.get("std", {})
            if "mode" in row:
                style = {"color": colours[row["method"]], "marker": "o" if row["mode"] == "lora" else "s"}
                label = f"{row['method']} ({row['mode']})"
            else:
                style = {"color": "black", "marker": "*" if row["method"] == "retain model" else "X"}
                label = row["method"]
            ax.errorbar(
                m["model_utility"],
                max(m["forget_quality"], 1e-6),
                xerr=sd.get("model_utility", 0.0),
                yerr=sd.get("forget_quality", 0.0),
                linestyle="none",
                markersize=8 if "mode" in row else 12,
                capsize=2,
                label=label,
                **style,
            )
        if finetuned is not None:  # the goal: forget quality 0.5 with 0.95 of the finetuned model's utility
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
            ax.axvline(0.95 * finetuned, color="gray", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model utility (retain-side harmonic mean)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forget quality (KS p-value vs the retain model)")
    axes[0].set_title(f"TOFU from scratch, preset {results['preset']['name']}")
    if finetuned is not None:
        axes[1].set_xlim(0.85 * finetuned, 1.02 * finetuned)
        axes[1].set_title("zoom: utility within 85% of the finetuned model's")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7, ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: str, stem: str) -> list[Path]:
    """`<stem>.json`, `<stem>.md` and `<stem>.png` in `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=2))
    paths[1].write_text(markdown(results))
    scatter(results, paths[2])
    return paths
