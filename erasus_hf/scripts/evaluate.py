"""`erasus-hf evaluate`: evaluate a model (or an unlearning adapter) and write the JSON a later run uses as reference.

    erasus-hf evaluate --model retain_model --benchmark tofu --forget_split forget10 --output retain_eval.json
    erasus-hf evaluate --model unlearned --benchmark tofu mia --holdout_split holdout10 \\
        --reference retain_eval.json --output eval.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from accelerate import PartialState

from ..evaluation.result import EvaluationResult
from ..evaluation.suite import EVALUATORS, MetricSuite
from ..model_source import check_model_source
from ..modeling.loading import load_model


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Model to evaluate: a Hub id or a folder (a full model or a PEFT adapter)."})
    benchmark: list[str] = field(
        default_factory=lambda: ["tofu"], metadata={"help": f"Evaluators to run, any of: {', '.join(EVALUATORS)}."}
    )
    output: str = field(default="eval.json", metadata={"help": "Where the evaluation JSON goes."})
    reference: str | None = field(
        default=None,
        metadata={"help": "The retain model's evaluation JSON: forget quality (TOFU) and PrivLeak (MUSE) need it."},
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of an adapter (default: the adapter config's base model)."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Local TOFU folder ({split}.json files); default: the Hub (locuslab/TOFU)."}
    )
    forget_split: str = field(
        default="forget10", metadata={"help": "TOFU forget split: forget01, forget05, forget10."}
    )
    holdout_split: str | None = field(
        default=None, metadata={"help": "TOFU split never trained on: the non-members of membership inference (mia)."}
    )
    muse_data_dir: str | None = field(default=None, metadata={"help": "Local MUSE folder; default: the Hub."})
    muse_corpus: str = field(default="news", metadata={"help": "MUSE corpus: news or books."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate only the first N rows of each split."})
    batch_size: int = field(
        default=32,
        metadata={
            "help": "Examples per forward pass, and per generation batch unless --generation_batch_size is set."
        },
    )
    max_new_tokens: int = field(
        default=200,
        metadata={
            "help": "Most new tokens of a TOFU ROUGE answer (greedy; each answer stops at its EOS and a batch once "
            "every answer has). 200 = open-unlearning's TOFU setting; fewer cuts long answers and lowers ROUGE."
        },
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per generate call of the TOFU ROUGE generation (default: --batch_size; "
            "open-unlearning uses 32). Greedy answers do not depend on it beyond float rounding."
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "cuda, cpu, ...; default: this process's accelerator, else the CPU."}
    )


def run_evaluate(args: EvaluateArguments) -> EvaluationResult:
    from ..data.tofu import TOFUDataset, load_tofu

    # one process per device under torchrun / accelerate launch; on CPU, gloo needs to be asked for explicitly
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    check_model_source(args.model, args.base_model)  # named first; the model itself is loaded after the data checks
    data = {}
    if {"tofu", "mia", "memorization"} & set(args.benchmark):
        tofu = TOFUDataset.load(args.forget_split, data_dir=args.data_dir)
        data["tofu"] = tofu.select(args.max_examples) if args.max_examples else tofu
    if "mia" in args.benchmark:
        if args.holdout_split is None:
            raise ValueError("--benchmark mia needs --holdout_split: rows the model never trained on.")
        try:
            holdout = load_tofu(args.holdout_split, data_dir=args.data_dir)
        except ValueError as err:  # an empty file: name the option it came from
            raise ValueError(f"--holdout_split {args.holdout_split!r} (the non-members of mia): {err}") from err
        if len(holdout) == 0:
            raise ValueError(
                f"--holdout_split {args.holdout_split!r} (the non-members of mia) has no rows; membership inference "
                "needs rows the model never trained on."
            )
        data["holdout"] = holdout.select(range(min(len(holdout), args.max_examples or len(holdout))))
    if "muse" in args.benchmark:
        from ..data.muse import MUSEDataset

        data["muse"] = MUSEDataset.load(args.muse_corpus, data_dir=args.muse_data_dir)
    options = {name: {"batch_size": args.batch_size} for name in args.benchmark}
    suite = MetricSuite(
        args.benchmark,
        options=options,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
    )
    reference = EvaluationResult.load(args.reference) if args.reference else None
    suite.check(reference, **data)  # a reference of other rows is refused before the model is loaded
    model, tokenizer = load_model(args.model, args.base_model)
    model.to(args.device or state.device)
    result = suite.run(model, tokenizer, reference=reference, **data)
    result.meta.update(
        {
            "model_path": args.model,
            "forget_split": args.forget_split,
            "reference": args.reference,
            "num_processes": state.num_processes,
        }
    )
    if state.is_main_process:  # every process holds the gathered result; one writes it
        result.save(args.output)
        print(json.dumps(result.summary, indent=2))
    return result
