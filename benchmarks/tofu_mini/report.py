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
    ("model_utility", "MU", "{:.3f}"),
    ("forget_truth_ratio", "forget TR", "{:.3f}"),
    ("forget_prob", "forget P", "{:.3f}"),
    ("forget_rouge", "forget ROUGE", "{:.3f}"),
    ("retain_prob", "retain P", "{:.3f}"),
    ("retain_rouge", "retain ROUGE", "{:.3f}"),
    ("loss_auc", "MIA LOSS", "{:.3f}"),
    ("min_k_plus_plus_auc", "MIA Min-K%++", "{:.3f}"),
)


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


def markdown(results: dict) -> str:
    env, preset = results["environment"], results["preset"]
    lines = [
        f"`{results['command']}` on {env['machine']} ({env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, erasus_hf {env['erasus_hf']}; {results['seconds']:.0f} s in all.",
        "",
        f"Preset `{preset['name']}`: {results['models']['parameters'] / 1e6:.2f}M-parameter Llama; "
        f"{results['models']['finetuned_train_rows']} training rows (finetuned), "
        f"{results['models']['retain_train_rows']} (retain); forget `{preset['forget_split']}`; "
        f"{preset['unlearn_epochs']} unlearning epochs, batch {preset['batch_size']}.",
        "",
        "| model | mode | lr | " + " | ".join(c[1] for c in COLUMNS) + " | best-epoch FQ | train s | peak MiB |",
        "|---" * (len(COLUMNS) + 6) + "|",
    ]
    for row in results["rows"]:
        metrics = row["metrics"]
        cells = [c[2].format(metrics[c[0]]) if c[0] in metrics else "-" for c in COLUMNS]
        lr = f"{row['learning_rate']:.0e}" if "learning_rate" in row else "-"
        seconds = f"{row['train_seconds']:.1f}" if "train_seconds" in row else "-"
        peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
        best = max(row.get("trace", []), key=lambda point: point["forget_quality"], default=None)
        best = f"{best['forget_quality']:.2e} ({best['epoch']})" if best else "-"
        cells += [best, seconds, peak]
        lines.append(f"| {row['method']} | {row.get('mode', '-')} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in results["rows"]:
        m = row["metrics"]
        marker = {"lora": "o", "full": "s"}.get(row.get("mode"), "*")
        ax.scatter(m["model_utility"], m["forget_quality"], marker=marker, s=60 if marker != "*" else 160)
        ax.annotate(
            f"{row['method']}" + (f" ({row['mode']})" if "mode" in row else ""),
            (m["model_utility"], m["forget_quality"]),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    finetuned = next((r["metrics"]["model_utility"] for r in results["rows"] if r["method"] == "finetuned"), None)
    if finetuned is not None:  # the goal: forget quality above 0.1 with at least 0.9 of the finetuned utility
        ax.axhline(0.1, color="gray", linestyle="--", linewidth=0.8)
        ax.axvline(0.9 * finetuned, color="gray", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("model utility (retain-side harmonic mean)")
    ax.set_ylabel("forget quality (KS p-value vs the retain model)")
    ax.set_title(f"TOFU from scratch, preset {results['preset']['name']} (o LoRA, s full, * models)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
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
