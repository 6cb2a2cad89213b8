"""The offline demo: memorise real TOFU authors from scratch, then unlearn two of them with NPO + LoRA.

Offline (the default) it needs nothing but the package: a TOFU slice ships inside it. Online, point it at a model
that already knows TOFU (`--model_name_or_path`) and at the Hub dataset (`--dataset locuslab/TOFU`) or a local copy
of its split files (`--data_dir`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import datasets
import torch
import transformers
from datasets import Dataset

from .config import UnlearningConfig
from .data.tofu import TOFUDataset, demo_splits, load_tofu
from .evaluation import EvaluationResult, TOFUEvaluator, answer_nll
from .modeling.loading import starting_model
from .redaction import redact, redact_json
from .trainer import UnlearningTrainer


@dataclass
class DemoArguments:
    output_dir: str = field(default="erasus_demo_output", metadata={"help": "Where the adapter and report go."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A model that already learned TOFU (Hub id or path). Default: train a tiny Llama here."},
    )
    dataset: str | None = field(default=None, metadata={"help": "Hub dataset id, e.g. locuslab/TOFU (online)."})
    data_dir: str | None = field(default=None, metadata={"help": "Local folder with TOFU split files (*.json)."})
    forget_split: str = field(default="forget01", metadata={"help": "Forget split (with --dataset/--data_dir)."})
    retain_split: str = field(
        default="retain_perturbed", metadata={"help": "Retain split (with --dataset/--data_dir)."}
    )
    num_retain_authors: int = field(default=6, metadata={"help": "Retain authors of the embedded slice."})
    strategy: str = field(default="npo", metadata={"help": "Unlearning strategy."})
    unlearn_epochs: float = field(default=10, metadata={"help": "Unlearning epochs over the forget set."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Unlearning learning rate (LoRA)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    batch_size: int = field(default=8, metadata={"help": "Forget (and retain) examples per step."})
    seed: int = field(default=0, metadata={"help": "Seed of model init, training and pairing."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})


def _load_data(args: DemoArguments) -> tuple[Dataset, Dataset]:
    if args.dataset is None and args.data_dir is None:
        return demo_splits(args.num_retain_authors)
    kwargs = {"data_dir": args.data_dir} if args.data_dir else {"hub_id": args.dataset}
    forget_split = args.forget_split if args.forget_split.endswith("_perturbed") else f"{args.forget_split}_perturbed"
    return load_tofu(forget_split, **kwargs), load_tofu(args.retain_split, **kwargs)


def tofu_trainer(
    model, tokenizer, config: UnlearningConfig, forget: Dataset, retain: Dataset, **trainer_options
) -> UnlearningTrainer:
    """The trainer of a TOFU run (the demo's and `erasus-hf unlearn`'s): it unlearns the forget rows' question/answer
    pairs and keeps the retain rows'; their other columns (paraphrased and perturbed answers) are the evaluators'.
    `trainer_options` go to `UnlearningTrainer` (in-training evaluation)."""
    return UnlearningTrainer(
        model,
        config,
        forget_dataset=forget.select_columns(["question", "answer"]),
        retain_dataset=retain.select_columns(["question", "answer"]),
        processing_class=tokenizer,
        **trainer_options,
    )


def measure(model, tokenizer, forget: Dataset, retain: Dataset, quiet: bool = True) -> dict[str, float]:
    """Forget/retain answer NLL, and TOFU's truth-ratio aggregates and ROUGE-L recall (`TOFUEvaluator`)."""
    desc = None if quiet else "Evaluating"
    forget_nll = answer_nll(model, tokenizer, forget["question"], forget["answer"], desc=desc)
    retain_nll = answer_nll(model, tokenizer, retain["question"], retain["answer"], desc=desc)
    data = TOFUDataset(forget=forget, retain=retain, forget_split="demo")
    tofu = TOFUEvaluator(data).evaluate(model, tokenizer).summary  # open-unlearning's generation settings
    return {
        "forget_nll": forget_nll.mean().item(),
        "retain_nll": retain_nll.mean().item(),
        **{
            f"{side}_{metric}": tofu[f"tofu/{side}_{metric}"]
            for metric in ("truth_ratio", "rouge")
            for side in ("forget", "retain")
        },
    }


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    notes = {
        "forget_nll": "higher = forgotten",
        "retain_nll": "should stay low",
        "forget_truth_ratio": "mean min(R, 1/R); 1 = no preference for the true answer",
        "retain_truth_ratio": "mean max(0, 1 - R); higher = true answer preferred",
        "forget_rouge": "ROUGE-L recall of greedy answers; lower = forgotten",
        "retain_rouge": "should stay high",
    }
    lines = [f"{'metric':<20}{'before':>10}{'after':>10}{'ratio':>8}  note", "-" * 90]
    for key, note in notes.items():
        ratio = after[key] / before[key] if before[key] else float("nan")
        lines.append(f"{key:<20}{before[key]:>10.3f}{after[key]:>10.3f}{ratio:>7.2f}x  {note}")
    return "\n".join(lines)


def run_demo(args: DemoArguments) -> dict:
    """Run the demo end to end; returns the report written to `output_dir/report.json`."""
    torch.manual_seed(args.seed)
    if args.quiet:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()  # the evaluators' bars too
    start = time.perf_counter()
    forget, retain = _load_data(args)
    model, tokenizer = starting_model(
        args.model_name_or_path, forget, retain, args.output_dir, seed=args.seed, quiet=args.quiet
    )
    trained = time.perf_counter()
    before = measure(model, tokenizer, forget, retain, quiet=args.quiet)

    config = UnlearningConfig(
        output_dir=args.output_dir,
        overwrite_output_dir=True,  # a rerun of the demo replaces its own earlier output
        strategy=args.strategy,
        use_peft=True,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.learning_rate,
        num_train_epochs=args.unlearn_epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=5,
        seed=args.seed,
        disable_tqdm=args.quiet,
    )
    print(f"Unlearning {len(forget)} forget examples with {args.strategy} + LoRA (retain: {len(retain)} examples)...")
    trainer = tofu_trainer(model, tokenizer, config, forget, retain)
    trainer.train()
    trainer.save_model()
    after = measure(trainer.model, tokenizer, forget, retain, quiet=args.quiet)

    report = {
        "demo": asdict(args),
        "strategy": {
            "name": trainer.strategy.name,
            "paper": trainer.strategy.paper,
            **trainer.strategy.hyperparameters,
        },
        "reference": trainer.reference_mode,
        "num_forget": len(forget),
        "num_retain": len(retain),
        "before": before,
        "after": after,
        "seconds": {"starting_model": trained - start, "total": time.perf_counter() - start},
        "log_history": trainer.state.log_history,
    }
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(redact_json(report), f, indent=2)
    trainer.create_model_card(
        evaluation=EvaluationResult(summary={f"demo/{k}": v for k, v in after.items()}),
        command="erasus-hf demo" + (f" --strategy {args.strategy}" if args.strategy != "npo" else ""),
        datasets=["locuslab/TOFU"],
    )
    print()
    print(format_table(before, after))
    print(
        redact(
            f"\nWritten to {args.output_dir}: {', '.join(sorted(os.listdir(args.output_dir)))} "
            f"({report['seconds']['total']:.0f} s in all)."
        )
    )
    return report
