"""`erasus-hf unlearn`: one unlearning run from a YAML recipe, on one process or under `accelerate launch`/`torchrun`.

    erasus-hf unlearn --config trainers/recipes/tofu_tiny_npo_lora.yaml
    accelerate launch --config_file trainers/accelerate/ddp.yaml trainers/unlearn.py \\
        --config trainers/recipes/tofu_forget10_npo_lora.yaml --learning_rate 2e-5

The output folder gets the weights (the adapter, or the merged/full model, as safetensors), the tokenizer,
`unlearning_config.json`, `strategy.json` and, with `evaluate=true`, the TOFU evaluation `eval.json`; only the main
process writes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import set_seed

from ..config import UnlearningConfig
from ..data.tofu import TOFUDataset, demo_splits, load_tofu
from ..demo import tofu_trainer
from ..evaluation.suite import MetricSuite
from ..modeling.loading import starting_model
from ..redaction import redact
from ..reference import ModelReference
from ..trainer import UnlearningTrainer


@dataclass
class UnlearnArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The model to unlearn from (Hub id or folder). None: train a tiny Llama on the data here."},
    )
    dataset: str = field(
        default="locuslab/TOFU",
        metadata={"help": "Hub dataset id of TOFU, or 'demo' for the slice shipped in the package (offline)."},
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "A local folder of TOFU split files ({split}.json), used instead of the Hub."}
    )
    forget_split: str = field(
        default="forget10", metadata={"help": "TOFU forget split: forget01, forget05, forget10."}
    )
    retain_split: str = field(default="retain90", metadata={"help": "TOFU retain split matching the forget split."})
    num_retain_authors: int = field(default=6, metadata={"help": "Retain authors taken from the 'demo' slice."})
    run_evaluation: bool = field(
        default=True, metadata={"help": "Evaluate with TOFU after training and write eval.json to output_dir."}
    )
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N rows of each TOFU set (quick runs)."}
    )
    reference_eval: str | None = field(
        default=None,
        metadata={
            "help": "The retain model's eval JSON (erasus-hf evaluate): gives forget quality; also used in-training."
        },
    )


def load_data(args: UnlearnArguments) -> tuple[Dataset, Dataset, TOFUDataset]:
    """(forget rows, retain rows, TOFU evaluation sets)."""
    if args.dataset == "demo":
        forget, retain = demo_splits(args.num_retain_authors)
        return forget, retain, TOFUDataset(forget=forget, retain=retain, forget_split="demo")
    where = {"data_dir": args.data_dir} if args.data_dir else {"hub_id": args.dataset}
    forget, retain = load_tofu(args.forget_split, **where), load_tofu(args.retain_split, **where)
    return forget, retain, TOFUDataset.load(args.forget_split, **where)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of the trainable parameters (what a run changed), to compare processes and runs."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def summary_table(summary: dict[str, float], path: str) -> str:
    """The final evaluation as the run's last lines on stdout: one `metric  value` row per summary metric, under
    the path of the JSON that holds them with the per-example values."""
    width = max((len(name) for name in summary), default=0)
    rows = [
        f"  {name:<{width}}  {value:.4g}" if _number(value) else f"  {name:<{width}}  {value}"
        for name, value in summary.items()
    ]
    return "\n".join([f"final evaluation (all of it in {path}):", *rows])


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def run_unlearn(args: UnlearnArguments, config: UnlearningConfig, command: str | None = None) -> UnlearningTrainer:
    """Train, save the weights, evaluate with TOFU (eval.json) and write the model card; `command` (the command
    line that ran this) goes into the card, redacted (no token reaches the card: `erasus_hf.redaction`)."""
    from ..data.validation import check_qa_rows
    from ..output_folder import check_output_dir

    set_seed(config.seed)  # the same LoRA initialisation on every process and in every run
    forget, retain, tofu = load_data(args)
    if args.eval_max_examples:
        tofu = tofu.select(args.eval_max_examples)
    if args.run_evaluation and args.reference_eval:  # a reference of other rows is refused before any training
        MetricSuite(["tofu"]).check(args.reference_eval, tofu=tofu)
    # one run per folder and well-formed rows, refused before the starting model is trained into output_dir
    check_output_dir(config.output_dir, config.overwrite_output_dir)
    check_qa_rows(forget, "forget")
    if retain is not None:
        check_qa_rows(retain, "retain")
    model, tokenizer = starting_model(args.model_name_or_path, forget, retain, config.output_dir, seed=config.seed)
    in_training = config.eval_strategy != "no"
    trainer = tofu_trainer(
        model,
        tokenizer,
        config,
        forget,
        retain,
        evaluators=["tofu"] if in_training else None,
        evaluation_data={"tofu": tofu} if in_training else None,
        evaluation_reference=args.reference_eval,
    )
    rank = trainer.args.process_index
    reference_model = trainer.reference.model if isinstance(trainer.reference, ModelReference) else None
    print(
        f"[rank {rank}] reference {trainer.reference_mode}"
        + (
            f" ({type(reference_model).__name__}, trainable tensors: "
            f"{sum(p.requires_grad for p in reference_model.parameters())})"
            if reference_model is not None
            else ""
        )
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)  # `--resume_from_checkpoint`
    trainer.save_model()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    print(
        f"[rank {rank}] trained weights sha256 {weights_fingerprint(unwrapped)} "
        f"(policy wrapped as {type(trainer.model_wrapped).__name__})"
    )
    result = None
    if args.run_evaluation:
        result = MetricSuite(["tofu"]).run(unwrapped, tokenizer, tofu=tofu, reference=args.reference_eval)
        result.meta["reference"] = args.reference_eval
        trainer.log({f"final_{k}": v for k, v in result.summary.items()})
        if trainer.args.should_save:
            result.save(os.path.join(config.output_dir, "eval.json"))
    datasets = None if args.dataset == "demo" else [args.dataset]
    trainer.create_model_card(evaluation=result, command=command, datasets=datasets)
    if trainer.args.should_save:
        print(redact(f"[rank {rank}] wrote {config.output_dir}: {', '.join(sorted(os.listdir(config.output_dir)))}"))
        if result is not None:  # the run's last lines: its final metrics
            print(redact(summary_table(result.summary, os.path.join(config.output_dir, "eval.json"))))
    return trainer
