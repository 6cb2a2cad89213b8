"""`UnlearningVerifier` on the TOFU-mini models: the finetuned model, the retain model and the two best TOFU-mini
methods of benchmarks/results/tofu_mini_small.md (the highest forget quality with model utility above 0.7: wga and
satimp, both with LoRA, at their methods.py learning rates 2e-3 and 3e-3).

    python -m benchmarks.verification                      # preset small, retain authors cut to 0-4 (2 CPU cores)
    python -m benchmarks.verification --retain_authors 30  # the full small preset (about an hour more on 2 cores)

The models are built and trained by benchmarks/tofu_mini (models.trained_models, models.train_model,
protocol.run_method); nothing of their recipe is repeated here. Members: the forget split's rows; non-members (the
holdout): the preset's holdout authors, never trained on by any model. The retrained model is the retain model
(seed --seed); the control is a second retain model (seed --seed + 1). The likelihood-ratio audit's references: the
retain model and the control as OUT, the finetuned model as IN (left out when it is the audited model, which leaves
the offline test). The retain model's own row is verified against the control as its retrained model (against
itself every comparison would be 0 by construction), without a control and without the audit (only one OUT model
besides itself).

Writes benchmarks/results/verification_<preset>.{md,json}; the trained models are cached under --cache_dir as
benchmarks.tofu_mini caches them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from unittest import mock

import datasets
import torch
import transformers

from erasus_hf.verification import ReferenceModel, UnlearningVerifier

from .tofu_mini import protocol
from .tofu_mini.methods import methods
from .tofu_mini.models import add_data_options, load_splits, train_model, trained_models
from .tofu_mini.presets import PRESETS
from .tofu_mini.report import environment

RUNS = (("wga", "lora"), ("satimp", "lora"))
"""The two best TOFU-mini runs of tofu_mini_small.md (forget quality 0.77 and 0.27, model utility 0.73 and 0.77)."""

VERIFIER = dict(relearn_steps=(2, 4, 8), relearn_learning_rate=1e-3, bootstrap_resamples=1000)
"""The verifier's settings besides its defaults: the relearning grid and learning rate of
tests/test_verification_behaviour.py (the default 1e-4 barely moves a model trained from scratch at 3e-3)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.verification",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="small", choices=list(PRESETS), help="tofu_mini preset (default: small)")
    parser.add_argument(
        "--retain_authors",
        type=int,
        default=5,
        help="train on the preset's first N retain authors only (default 5, authors 0-4: 100 rows, which still "
        "hold the 100 retain evaluation rows; 0: the preset's own)",
    )
    add_data_options(parser)
    parser.add_argument("--out_dir", default="benchmarks/results", help="where the table and JSON go")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train the finetuned and retain models again")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def unlearn(method, mode, finetuned, tokenizer, preset, splits, reference, args) -> tuple[torch.nn.Module, dict]:
    """`protocol.run_method` as the TOFU-mini benchmark runs it, keeping the unlearned model it evaluates (the
    function returns only the numbers): its `evaluate` is wrapped to record the model it is given."""
    kept = {}
    evaluate = protocol.evaluate

    def recording(model, *rest, **kwargs):
        kept["model"] = model
        return evaluate(model, *rest, **kwargs)

    with mock.patch.object(protocol, "evaluate", recording):
        row = protocol.run_method(
            method, mode, finetuned, tokenizer, preset, splits, reference,
            device=args.device, seed=args.seed, trace=False, quiet=args.quiet,
        )  # fmt: skip
    return kept["model"].eval(), row


def summary(result) -> dict:
    """The table's numbers of one `VerificationResult`."""
    names = {c.name for c in result.checks}
    auc = result["mia_auc/loss"]
    tpr = next(t for t in auc.details["tpr_at_fpr"] if t["target_fpr"] == 0.01)
    row = {
        "loss_auc": auc.value,
        "loss_auc_interval": [auc.interval["low"], auc.interval["high"]],
        "tpr_at_1pct_fpr": tpr["tpr"],
        "epsilon_holdout": result["epsilon/holdout"].value if "epsilon/holdout" in names else None,
        "epsilon_retrained": result["epsilon/retrained"].value if "epsilon/retrained" in names else None,
        "rejected": len(result.rejected),
        "rejected_null_valid": sum(c.rejected and c.null_valid for c in result.checks),
        "holm_rejected": len(result.meta["family"]["holm_rejected"]),
        "checks": len(result.checks),
    }
    if "mia_auc_vs_retrained/loss" in names:
        diff = result["mia_auc_vs_retrained/loss"]
        row["auc_minus_retrained"] = diff.value
        row["auc_minus_retrained_interval"] = [diff.interval["low"], diff.interval["high"]]
    if "lira" in names:
        row["lira_identified"] = result["lira"].value
        row["lira_p_value"] = result["lira"].p_value
    if "relearning" in names:
        relearning = result["relearning"]
        row["relearning"] = relearning.value
        row["relearning_p_value"] = relearning.p_value
        row["relearning_gain"] = relearning.details.get("gain")
    return row


def _cell(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    env, preset = results["environment"], results["preset"]
    lines = [
        f"`{results['command']}` on {env['machine']} ({env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}, erasus_hf {env['erasus_hf']}; {results['seconds']:.0f} s in all.",
        "",
        f"Preset `{preset['name']}`: {results['models']['parameters'] / 1e6:.2f}M-parameter Llama; retain authors "
        f"{preset['retain_authors'][0]}-{preset['retain_authors'][-1]} ({results['models']['retain_train_rows']} "
        f"rows), forget `{preset['forget_split']}` ({results['forget_rows']} rows, members), holdout authors "
        f"{preset['holdout_authors'][0]}-{preset['holdout_authors'][-1]} ({results['holdout_rows']} rows, never "
        f"trained on: the non-members). Retrained model: the retain model (seed {results['seed']}); control: a second "
        f"retain model (seed {results['seed'] + 1}); LiRA references: both as OUT, the finetuned model as IN. "
        f"Level alpha = {results['alpha']:g}; {results['bootstrap_resamples']} bootstrap resamples; relearning "
        f"{results['verifier']['relearn_steps']} steps at lr {results['verifier']['relearn_learning_rate']:g}.",
        "",
        "| model | FQ | MU | loss AUC [95%] | TPR @1% FPR | AUC - retrained [95%] | epsilon lower (holdout / "
        "retrained) | LiRA identified @5% FPR | relearned acc - retrained (p) | rejected / after Holm (of checks) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        s, m = row["summary"], row.get("metrics", {})
        auc = f"{s['loss_auc']:.3f} [{s['loss_auc_interval'][0]:.3f}, {s['loss_auc_interval'][1]:.3f}]"
        diff = "-"
        if "auc_minus_retrained" in s:
            low, high = s["auc_minus_retrained_interval"]
            diff = f"{s['auc_minus_retrained']:+.3f} [{low:+.3f}, {high:+.3f}]"
        relearn = "-"
        if "relearning" in s:
            relearn = f"{s['relearning']:+.3f} ({s['relearning_p_value']:.2g})"
        lines.append(
            f"| {row['model']} | {_cell(m.get('forget_quality'), '{:.2e}')} | {_cell(m.get('model_utility'))} | "
            f"{auc} | {s['tpr_at_1pct_fpr']:.3f} | {diff} | {_cell(s['epsilon_holdout'], '{:.2f}')} / "
            f"{_cell(s['epsilon_retrained'], '{:.2f}')} | {_cell(s.get('lira_identified'))} | {relearn} | "
            f"{s['rejected']} / {s['holm_rejected']} (of {s['checks']}) |"
        )
    lines += ["", "Rows:"]
    lines += [f"- {row['model']}: {row['note']}" for row in results["rows"]]
    lines += [
        "",
        "Columns: FQ and MU as benchmarks.tofu_mini measures them (against the retain model); the loss attack's AUC "
        "forget vs holdout with its bootstrap interval, and its TPR at 1% FPR (1 of the holdout rows); the paired "
        "difference to the retrained model's AUC on the same rows; the epsilon lower bounds proven against the "
        "holdout and against the retrained model on the same rows (95%, every attack and threshold tried); the "
        "fraction of forget rows the likelihood-ratio audit identifies at 5% FPR; the relearning check (forget "
        "accuracy after a few fine-tuning steps on half the forget rows, minus the retrained model's, one-sided "
        "Wilcoxon p); how many checks reject their null at level alpha, individually and after Holm's correction "
        "over those with a p-value. Each row's checks are in the JSON (`verification`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    preset = PRESETS[args.preset]
    if args.retain_authors and args.retain_authors < len(preset.retain_authors):
        authors = preset.retain_authors[: args.retain_authors]
        preset = replace(preset, name=f"{preset.name}_r{args.retain_authors}", retain_authors=authors)
    splits = load_splits(preset, args.data_dir)
    trained = trained_models(preset, splits, args.cache_dir, seed=args.seed, quiet=args.quiet, retrain=args.retrain)
    tokenizer = trained["tokenizer"]
    finetuned, retain = (trained[name].to(args.device).eval() for name in ("finetuned", "retain"))
    control_path = Path(args.cache_dir) / preset.name / f"control-seed{args.seed + 1}-{trained['meta']['key']}"
    if control_path.is_dir() and not args.retrain:
        control = transformers.AutoModelForCausalLM.from_pretrained(control_path)
    else:
        print(f"Training the control (a retain model, seed {args.seed + 1}) on {len(splits.train_retain)} rows...")
        control, _ = train_model(preset, tokenizer, splits.train_retain, args.seed + 1, args.quiet)
        control.save_pretrained(control_path)
    control = control.to(args.device).eval()

    print("Evaluating the retain model (the reference of forget quality) and the finetuned model...")
    reference = protocol.evaluate(retain, tokenizer, preset, splits, None)
    finetuned_metrics = protocol.evaluate(finetuned, tokenizer, preset, splits, reference["raw"])["metrics"]
    reference["metrics"]["forget_quality"] = 1.0  # the reference against itself
    catalogue = methods(preset.model.num_layers)
    audited = [
        ("finetuned", finetuned, finetuned_metrics, {}),
        ("retain model", retain, reference["metrics"], {}),
    ]
    for name, mode in RUNS:
        model, row = unlearn(catalogue[name], mode, finetuned, tokenizer, preset, splits, reference["raw"], args)
        audited.append((f"{name} ({mode}, lr {row['learning_rate']:.0e})", model, row["metrics"], row))

    forget = splits.forget.select_columns(["question", "answer"])
    in_ref = ReferenceModel(finetuned, True, "finetuned")
    out_refs = [ReferenceModel(retain, False, "retain"), ReferenceModel(control, False, "control")]
    rows = []
    for label, model, metrics, run in audited:
        print(f"Verifying {label}...")
        if model is retain:
            verifier = UnlearningVerifier(forget, splits.holdout, seed=args.seed, **VERIFIER)
            result = verifier.verify(model, tokenizer, retrained=control)
            note = (
                f"retrained model: the control (seed {args.seed + 1}), no control; LiRA not run (one OUT model "
                "besides itself)"
            )
        else:
            references = out_refs if model is finetuned else [in_ref, *out_refs]
            verifier = UnlearningVerifier(forget, splits.holdout, references=references, seed=args.seed, **VERIFIER)
            result = verifier.verify(model, tokenizer, retrained=retain, control=control)
            note = (
                f"retrained model: the retain model (seed {args.seed}); control: seed {args.seed + 1}; LiRA: "
                + ", ".join(f"{r.name} ({'IN' if r.members is True else 'OUT'})" for r in references)
            )
        rows.append(
            {
                "model": label,
                "note": note,
                "metrics": metrics,
                "run": {k: v for k, v in run.items() if k not in ("metrics", "forget_truth_ratios")},
                "summary": summary(result),
                "verification": result.to_dict(),
            }
        )
        print(f"  {result.meta['family']['statement']}")

    results = {
        "command": shlex.join(
            ["python", "-m", "benchmarks.verification", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": environment(args.device),
        "preset": {
            **asdict(preset),
            "retain_authors": [preset.retain_authors[0], preset.retain_authors[-1]],
            "holdout_authors": [preset.holdout_authors[0], preset.holdout_authors[-1]],
        },
        "models": {k: v for k, v in trained["meta"].items() if k != "key"},
        "seed": args.seed,
        "forget_rows": len(forget),
        "holdout_rows": len(splits.holdout),
        "alpha": verifier.alpha,
        "bootstrap_resamples": verifier.bootstrap_resamples,
        "verifier": {k: list(v) if isinstance(v, tuple) else v for k, v in VERIFIER.items()},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"verification_{args.preset}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    for suffix in (".md", ".json"):
        print(f"wrote {out / (stem + suffix)}")
    return results


if __name__ == "__main__":
    main()
