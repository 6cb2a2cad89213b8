"""`erasus-hf evaluate`: evaluate a model (or an unlearning adapter) and write the JSON a later run uses as reference.

    erasus-hf evaluate --model retain_model --benchmark tofu --forget_split forget10 --output retain_eval.json
    erasus-hf evaluate --model unlearned --benchmark tofu mia --holdout_split holdout10 \\
        --reference retain_eval.json --output eval.json
    erasus-hf evaluate --model unlearned --forget_dataset_name forget.jsonl --retain_dataset_name retain.jsonl

Rows of any format (`--forget_dataset_name`, `--retain_dataset_name`, as `erasus-hf unlearn` takes them) are scored
as `unlearn` trained them (the same formatting options): `--benchmark rows` (the default with them) gives their NLL,
exact memorization and extraction strength; `memorization` and `mia` read them as their forget/retain sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState

from ..data.loading import DataSource
from ..evaluation.result import EvaluationResult
from ..evaluation.rows import RowsEvaluator
from ..evaluation.suite import EVALUATORS, MetricSuite
from ..model_source import check_model_source, load_tokenizer
from ..modeling.loading import load_model
from .data_options import (
    TOKENIZER_HELP,
    FormatArguments,
    chat_template_option,
    check_side,
    merged_model_init_kwargs,
    model_init_field,
    side_field,
    text_format_of,
)
from .parsing import UsageError

ROWS = "rows"  # the evaluation of the --forget/--retain_dataset rows themselves (RowsEvaluator)


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Model to evaluate: a Hub id or a folder (a full model or a PEFT adapter)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": TOKENIZER_HELP})
    dtype: str | None = model_init_field("dtype")
    attn_implementation: str | None = model_init_field("attn_implementation")
    trust_remote_code: bool = model_init_field("trust_remote_code")
    benchmark: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Evaluators to run, any of: {', '.join([*EVALUATORS, ROWS])} ({ROWS}: the NLL, exact "
            "memorization and extraction strength of the --forget/--retain_dataset rows). Default: rows with "
            "--forget_dataset_name, else tofu."
        },
    )
    forget_dataset_name: str | None = side_field("forget", "name")
    forget_dataset_config: str | None = side_field("forget", "config")
    forget_dataset_split: str | None = side_field("forget", "split")
    retain_dataset_name: str | None = side_field("retain", "name")
    retain_dataset_config: str | None = side_field("retain", "config")
    retain_dataset_split: str | None = side_field("retain", "split")
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


def custom_sides(args: EvaluateArguments) -> dict[str, tuple[DataSource, Any]]:
    """The `--forget/--retain_dataset_*` rows, loaded: side -> (source, rows)."""
    sides = {}
    for side in ("forget", "retain"):
        name, config, split = (getattr(args, f"{side}_dataset_{part}") for part in ("name", "config", "split"))
        prefix = f"--{side}_dataset"
        if name is None:
            if config is not None or split is not None:
                raise UsageError(f"{prefix}_{'config' if config is not None else 'split'} needs {prefix}_name.")
            continue
        source = DataSource(name, config, split or "train", (f"{prefix}_name", f"{prefix}_config", f"{prefix}_split"))
        sides[side] = (source, source.load())
    return sides


def run_evaluate(args: EvaluateArguments, formats: Any = None) -> EvaluationResult:
    """Evaluate `args.model` with the evaluators of `args.benchmark` and write the JSON; `formats` (a
    `FormatArguments`: default its defaults) says how rows are rendered, as the run trained them."""
    from ..data.tofu import TOFUDataset, load_tofu

    formats = formats if formats is not None else FormatArguments()
    text_format = text_format_of(formats)
    chat_template = chat_template_option(formats)  # as unlearn applied it to the tokenizer it saved
    # one process per device under torchrun / accelerate launch; on CPU, gloo needs to be asked for explicitly
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    check_model_source(args.model, args.base_model)  # named first; the model itself is loaded after the data checks
    kwargs = merged_model_init_kwargs(args, None)
    sides = custom_sides(args)
    benchmark = args.benchmark or ([ROWS] if sides else ["tofu"])
    unknown = [name for name in benchmark if name != ROWS and name not in EVALUATORS]
    if unknown:
        raise UsageError(f"--benchmark {unknown[0]!r} is no evaluator; valid: {', '.join([*EVALUATORS, ROWS])}.")
    if ROWS in benchmark and "forget" not in sides:
        raise UsageError(
            "--benchmark rows scores the --forget_dataset_name rows (and --retain_dataset_name's): give them."
        )
    data: dict[str, Any] = {}
    for side, (source, rows) in sides.items():
        check_side(rows, side, source, text_format)
        cut = rows.select(range(min(len(rows), args.max_examples))) if args.max_examples else rows
        data[side] = cut
    # mia and memorization score the given rows as their forget/retain sets, TOFU's without them
    if "tofu" in benchmark or (not sides and {"mia", "memorization"} & set(benchmark)):
        tofu = TOFUDataset.load(args.forget_split, data_dir=args.data_dir)
        data["tofu"] = tofu.select(args.max_examples) if args.max_examples else tofu
    if "mia" in benchmark:
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
    if "muse" in benchmark:
        from ..data.muse import MUSEDataset

        data["muse"] = MUSEDataset.load(args.muse_corpus, data_dir=args.muse_data_dir)
    evaluators = [
        RowsEvaluator(
            {side: data[side] for side in sides},
            text_format,
            max_length=formats.max_length,
            batch_size=args.batch_size,
        )
        if name == ROWS
        else name
        for name in benchmark
    ]
    options = {name: {"batch_size": args.batch_size} for name in benchmark if name != ROWS}
    suite = MetricSuite(
        evaluators,
        options=options,
        max_new_tokens=args.max_new_tokens,
        generation_batch_size=args.generation_batch_size,
    )
    reference = EvaluationResult.load(args.reference) if args.reference else None
    suite.check(reference, **data)  # a reference of other rows is refused before the model is loaded
    model, tokenizer = load_model(args.model, args.base_model, model_init_kwargs=kwargs)
    if args.tokenizer_name_or_path is not None:
        tokenizer = load_tokenizer(args.tokenizer_name_or_path, kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    for side, (source, _) in sides.items():
        check_side(data[side], side, source, text_format, tokenizer)
    model.to(args.device or state.device)
    result = suite.run(model, tokenizer, reference=reference, text_format=text_format, **data)
    result.meta.update(
        {
            "model_path": args.model,
            "forget_split": args.forget_split,
            "reference": args.reference,
            "num_processes": state.num_processes,
        }
    )
    if sides:
        result.meta["data"] = {side: source.describe() for side, (source, _) in sides.items()}
    if state.is_main_process:  # every process holds the gathered result; one writes it
        result.save(args.output)
        print(json.dumps(result.summary, indent=2))
    return result
