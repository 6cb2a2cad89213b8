"""`erasus-hf unlearn`: one unlearning run from a YAML recipe, on one process or under `accelerate launch`/`torchrun`.

    erasus-hf unlearn --config trainers/recipes/tofu_tiny_npo_lora.yaml
    erasus-hf unlearn --forget_dataset_name forget.jsonl --retain_dataset_name retain.jsonl --strategy npo
    erasus-hf unlearn --benchmark muse --data_dir ../shared/data/muse/news --use_peft
    accelerate launch --config_file trainers/accelerate/ddp.yaml trainers/unlearn.py \\
        --config trainers/recipes/tofu_forget10_npo_lora.yaml --learning_rate 2e-5

The rows: a benchmark's (`--benchmark tofu`, the default, or `muse`), or any dataset's, one per side
(`--forget_dataset_name`, `--retain_dataset_name`: files, folders or Hub ids, rows of any format of
`data.formats.TextFormat`). The output folder gets the weights (the adapter, or the merged/full model, as
safetensors), the tokenizer, `unlearning_config.json`, `strategy.json` and, with `run_evaluation`, `eval.json`: the
benchmark's evaluation, or without one the forget/retain NLL and memorization of the run's own rows; only the main
process writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase, set_seed

from ..config import UnlearningConfig
from ..data.formats import RowFormatError, TextFormat
from ..data.loading import DataSource, one_line
from ..data.tofu import TOFUDataset, demo_splits, load_tofu
from ..evaluation.rows import RowsEvaluator
from ..evaluation.suite import MetricSuite
from ..model_source import check_model_source, load_tokenizer
from ..modeling.loading import load_model, starting_model, tiny_tokenizer
from ..modeling.tiny import DEMO_SFT
from ..redaction import redact
from ..reference import ModelReference
from ..trainer import UnlearningTrainer
from .data_options import (
    BENCHMARKS,
    MUSE_SIDES,
    SIDES,
    TOKENIZER_HELP,
    chat_template_option,
    check_side,
    merged_model_init_kwargs,
    model_init_field,
    side_field,
)
from .parsing import UsageError

TOFU_HUB_ID = "locuslab/TOFU"


@dataclass
class UnlearnArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model to unlearn from (Hub id or folder). None: train a tiny Llama here on the forget and "
            "retain rows, in their format."
        },
    )
    starting_model_epochs: float = field(
        default=DEMO_SFT.num_train_epochs,
        metadata={
            "help": "Without --model_name_or_path: the epochs of TRL SFT that teach the tiny Llama the forget and "
            "retain rows before unlearning (fewer: a faster, less memorised start)."
        },
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": TOKENIZER_HELP})
    dtype: str | None = model_init_field("dtype")
    attn_implementation: str | None = model_init_field("attn_implementation")
    trust_remote_code: bool = model_init_field("trust_remote_code")
    benchmark: str | None = field(
        default=None,
        metadata={
            "help": "The benchmark whose rows and evaluation the run uses: 'tofu' (TOFU's question/answer splits, "
            "--forget_split/--retain_split; the default without --forget_dataset_name) or 'muse' (forget = MUSE's raw "
            "forget articles raw/forget, retain = its knowledge QA knowmem/retain_qa; evaluated with VerbMem, "
            "KnowMem, PrivLeak). --dataset / --data_dir say where its data is.",
            "choices": list(BENCHMARKS),
        },
    )
    forget_dataset_name: str | None = side_field("forget", "name")
    forget_dataset_config: str | None = side_field("forget", "config")
    forget_dataset_split: str | None = side_field("forget", "split")
    retain_dataset_name: str | None = side_field("retain", "name")
    retain_dataset_config: str | None = side_field("retain", "config")
    retain_dataset_split: str | None = side_field("retain", "split")
    dataset: str | None = field(
        default=None,
        metadata={
            "help": f"The benchmark's Hub dataset: default {TOFU_HUB_ID} for tofu ('demo': the TOFU slice shipped in "
            "the package, offline), muse-bench/MUSE-News for muse (muse-bench/MUSE-Books: the Books corpus)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "A local copy of the benchmark, used instead of the Hub: TOFU split files ({split}.json), or one "
            "MUSE corpus folder ({config}/{split}.json, e.g. ../shared/data/muse/news)."
        },
    )
    forget_split: str = field(
        default="forget10", metadata={"help": "TOFU forget split: forget01, forget05, forget10."}
    )
    retain_split: str = field(default="retain90", metadata={"help": "TOFU retain split matching the forget split."})
    num_retain_authors: int = field(default=6, metadata={"help": "Retain authors taken from the 'demo' slice."})
    run_evaluation: bool = field(
        default=True,
        metadata={
            "help": "Evaluate after training and write eval.json to output_dir: the benchmark's evaluation, or "
            "without one the forget/retain rows' NLL, exact memorization and extraction strength."
        },
    )
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate only the first N rows of each evaluation set (quick runs)."}
    )
    reference_eval: str | None = field(
        default=None,
        metadata={
            "help": "The retain model's eval JSON (erasus-hf evaluate): gives TOFU's forget quality and MUSE's "
            "PrivLeak; also used in-training."
        },
    )


# ---- the rows ----


@dataclass
class RunData:
    """What a run trains and evaluates on: the forget and retain rows (retain None: none given), where each came
    from (`sources`, recorded in the evaluation's meta; `options`, the option and value that named them, for the
    messages), the benchmark (None: the rows themselves are evaluated) and its evaluation data (`MetricSuite.run`'s
    `tofu=` or `muse=`), and the Hub datasets behind them (the card's `datasets:`)."""

    forget: Dataset
    retain: Dataset | None
    sources: dict[str, str]
    options: dict[str, str]
    benchmark: str | None
    evaluation: dict[str, Any]
    hub_ids: list[str]


def benchmark_of(args: UnlearnArguments) -> str | None:
    """`--benchmark`, or TOFU when the forget rows are not given either."""
    if args.benchmark is not None:
        return args.benchmark
    if args.forget_dataset_name is None:
        return "tofu"
    for option in ("dataset", "data_dir"):
        if getattr(args, option) is not None:
            raise UsageError(
                f"--{option} {getattr(args, option)!r} says where a benchmark's data is, but there is no --benchmark "
                "(the rows come from --forget_dataset_name): add --benchmark tofu or muse, or drop it."
            )
    return None


def side_source(args: UnlearnArguments, side: str, benchmark: str | None) -> DataSource | None:
    """Where `side`'s rows come from when they are not the TOFU benchmark's: its `--{side}_dataset_*` options, or
    MUSE's split of the side (`MUSE_SIDES`, whose config and split those options may replace); None for TOFU's rows
    and for no retain rows."""
    prefix = f"--{side}_dataset"
    name, config, split = (getattr(args, f"{side}_dataset_{part}") for part in ("name", "config", "split"))
    flags = (f"{prefix}_name", f"{prefix}_config", f"{prefix}_split")
    if name is not None:
        return DataSource(name, config, split or "train", flags)
    if benchmark == "muse":
        default_config, default_split = MUSE_SIDES[side]
        where, option = (args.data_dir, "--data_dir") if args.data_dir else (muse_hub_id(args), "--dataset")
        return DataSource(where, config or default_config, split or default_split, (option, *flags[1:]))
    given = [f for f, value in zip(flags[1:], (config, split)) if value is not None]
    if given:
        what = "the TOFU splits are --forget_split/--retain_split" if benchmark == "tofu" else "no rows are named"
        raise UsageError(f"{given[0]} needs {prefix}_name ({what}).")
    return None


def muse_hub_id(args: UnlearnArguments) -> str:
    from ..data.muse import MUSE_HUB_IDS

    return args.dataset or MUSE_HUB_IDS["news"]


def muse_corpus(hub_id: str) -> str:
    from ..data.muse import MUSE_HUB_IDS

    return next((corpus for corpus, known in MUSE_HUB_IDS.items() if known.lower() == hub_id.lower()), "news")


def load_tofu_data(args: UnlearnArguments) -> tuple[Dataset, Dataset, TOFUDataset]:
    """(forget rows, retain rows, TOFU evaluation sets) of the TOFU benchmark."""
    if args.dataset == "demo":
        forget, retain = demo_splits(args.num_retain_authors)
        return forget, retain, TOFUDataset(forget=forget, retain=retain, forget_split="demo")
    where = {"data_dir": args.data_dir} if args.data_dir else {"hub_id": args.dataset or TOFU_HUB_ID}
    try:
        forget, retain = load_tofu(args.forget_split, **where), load_tofu(args.retain_split, **where)
        return forget, retain, TOFUDataset.load(args.forget_split, **where)
    except (OSError, ValueError) as err:  # a split not in data_dir, the Hub unreachable, an empty file
        option = "--data_dir" if args.data_dir else "--dataset"
        where_value = next(iter(where.values()))
        raise UsageError(f"--forget_split/--retain_split of {option} {where_value!r}: {one_line(err)}") from err


def load_run_data(args: UnlearnArguments, eval_max_examples: int | None = None) -> RunData:
    """The run's rows and evaluation data (see `RunData`), every source refused with its option before any model
    loads: a missing file, an unknown split, a benchmark that cannot be read."""
    benchmark = benchmark_of(args)
    rows: dict[str, Dataset | None] = {"forget": None, "retain": None}
    sources: dict[str, str] = {}
    options: dict[str, str] = {}
    evaluation: dict[str, Any] = {}
    hub_ids: list[str] = []
    if benchmark == "tofu":
        forget, retain, tofu = load_tofu_data(args)
        # the trainer reads the question/answer pairs; the other columns (paraphrased and perturbed answers) are
        # the evaluator's
        rows = {side: split.select_columns(["question", "answer"]) for side, split in zip(SIDES, (forget, retain))}
        if args.dataset == "demo":
            sources = {side: f"TOFU demo_{side} (the slice shipped in erasus_hf)" for side in SIDES}
            options = {side: "--dataset 'demo'" for side in SIDES}
        else:
            options = {side: f"--{side}_split {getattr(args, f'{side}_split')!r}" for side in SIDES}
            where = args.data_dir or args.dataset or TOFU_HUB_ID
            sources = {
                "forget": f"TOFU {args.forget_split} ({where})",
                "retain": f"TOFU {args.retain_split} ({where})",
            }
            hub_ids.append(args.dataset or TOFU_HUB_ID)
        evaluation["tofu"] = tofu.select(eval_max_examples) if eval_max_examples else tofu
    elif benchmark == "muse":
        evaluation["muse"] = load_muse_evaluation(args, eval_max_examples)
        hub_ids.append(muse_hub_id(args))
    for side in SIDES:
        source = side_source(args, side, benchmark)
        if source is not None:
            rows[side] = source.load()
            sources[side] = source.describe()
            options[side] = f"{source.option} {source.name!r}"
            if source.hub_id and source.hub_id not in hub_ids:
                hub_ids.append(source.hub_id)
    return RunData(rows["forget"], rows["retain"], sources, options, benchmark, evaluation, hub_ids)


def load_muse_evaluation(args: UnlearnArguments, eval_max_examples: int | None = None) -> Any:
    """The MUSE evaluation data (`MUSEDataset`) of `--data_dir` or `--dataset`."""
    from ..data.muse import MUSEDataset

    hub_id = muse_hub_id(args)
    try:
        muse = MUSEDataset.load(muse_corpus(hub_id), data_dir=args.data_dir, hub_id=hub_id)
    except (OSError, ValueError) as err:
        option = f"--data_dir {args.data_dir!r}" if args.data_dir else f"--dataset {hub_id!r}"
        raise UsageError(f"{option} (the MUSE evaluation data): {one_line(err)}") from err
    return muse.select(eval_max_examples) if eval_max_examples else muse


# ---- the model ----


def model_options(args: UnlearnArguments, config: UnlearningConfig) -> dict[str, Any] | None:
    """The run's `model_init_kwargs` (`--model_init_kwargs` with `--dtype`, `--attn_implementation`,
    `--trust_remote_code`), and the options that need a model to load refused without `--model_name_or_path`."""
    kwargs = merged_model_init_kwargs(args, config.model_init_kwargs)
    if args.model_name_or_path is not None:
        return kwargs
    if args.tokenizer_name_or_path is not None:
        raise UsageError(
            f"--tokenizer_name_or_path {args.tokenizer_name_or_path!r} needs --model_name_or_path; without it a "
            "tiny Llama and its own tokenizer are trained here on the rows."
        )
    if kwargs:
        raise UsageError(
            f"model_init_kwargs {sorted(kwargs)} (--dtype, --attn_implementation, --trust_remote_code, "
            "--model_init_kwargs) apply to a model loaded from --model_name_or_path; without it a tiny float32 "
            "Llama is trained here: drop them, or name the model."
        )
    return None


def prepare_model(
    args: UnlearnArguments,
    config: UnlearningConfig,
    data: RunData,
    text_format: TextFormat,
    model_init_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """(the model, or its id/path for the trainer to load with `model_init_kwargs`; its tokenizer), the rows checked
    against the tokenizer (a chat format needs a template, ...) before any weights load or train. Without
    `--model_name_or_path`, the tiny Llama is trained here on the rows (`modeling.loading.starting_model`)."""
    chat_template = chat_template_option(config)
    sides = {"forget": data.forget, "retain": data.retain}
    if args.model_name_or_path is None:
        for side, rows in sides.items():
            if rows is not None and "input_ids" in rows.column_names:
                raise UsageError(
                    f"{source_option(data, side)}: pre-tokenized rows (input_ids) need the model whose vocabulary "
                    "they use: pass --model_name_or_path."
                )
        tokenizer = tiny_tokenizer([r for r in sides.values() if r is not None], text_format, chat_template)
        check_sides(data, text_format, tokenizer)
        return starting_model(
            None,
            data.forget,
            data.retain,
            config.output_dir,
            seed=config.seed,
            text_format=text_format,
            tokenizer=tokenizer,
            max_length=config.max_length,
            num_train_epochs=args.starting_model_epochs,
        )
    path = args.model_name_or_path
    try:  # a missing folder, one that holds no model, an adapter whose base moved: named before anything loads
        check_model_source(path, needs_tokenizer=args.tokenizer_name_or_path is None)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model_name_or_path {path!r}: {one_line(err)}") from err
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # its base loads here, with the kwargs
        model, tokenizer = load_model(path, model_init_kwargs=model_init_kwargs)
        config.model_init_kwargs = None  # applied above; the trainer refuses them with a model object
    else:  # the trainer loads the model with model_init_kwargs, as TRL's trainers load a model id
        model, tokenizer = path, None
        config.model_init_kwargs = model_init_kwargs
    if tokenizer is None or args.tokenizer_name_or_path is not None:
        tokenizer = load_tokenizer(args.tokenizer_name_or_path or path, model_init_kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    check_sides(data, text_format, tokenizer)
    return model, tokenizer


def source_option(data: RunData, side: str) -> str:
    return data.options.get(side, side)


def check_sides(data: RunData, text_format: TextFormat, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Each side's rows fit a format (and this tokenizer can render it), refused naming where the rows came from."""
    for side, rows in (("forget", data.forget), ("retain", data.retain)):
        if rows is not None:
            check_side(rows, side, source_option(data, side), text_format, tokenizer)


# ---- evaluation ----


def evaluators_of(data: RunData, config: UnlearningConfig, text_format: TextFormat) -> list[Any]:
    """The run's evaluators: the benchmark's by name, or the rows' own (`RowsEvaluator`)."""
    if data.benchmark is not None:
        return [data.benchmark]
    splits = {side: rows for side, rows in (("forget", data.forget), ("retain", data.retain)) if rows is not None}
    return [
        RowsEvaluator(splits, text_format, max_length=config.max_length, batch_size=config.per_device_eval_batch_size)
    ]


def limited(data: RunData, eval_max_examples: int | None) -> RunData:
    """`data` whose own rows are cut to `eval_max_examples` for their evaluation (the training rows stay whole)."""
    if not eval_max_examples or data.benchmark is not None:
        return data
    cut = {
        side: None if rows is None else rows.select(range(min(eval_max_examples, len(rows))))
        for side, rows in (("forget", data.forget), ("retain", data.retain))
    }
    return dataclasses.replace(data, forget=cut["forget"], retain=cut["retain"])


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


def check_retain_needed(data_args: UnlearnArguments, config: UnlearningConfig) -> None:
    """A strategy with a retain term and no retain rows is refused before any row is read."""
    from ..strategies import get_strategy

    if benchmark_of(data_args) is not None or data_args.retain_dataset_name is not None:
        return
    if get_strategy(config.strategy, **config.strategy_kwargs).needs_retain(config.retain_loss):
        raise UsageError(
            f"--strategy {config.strategy} with --retain_loss {config.retain_loss} has a retain term and needs "
            "retain rows: pass --retain_dataset_name, or --retain_loss none to unlearn without them."
        )


def prepare_run(args: UnlearnArguments, config: UnlearningConfig) -> tuple[RunData, list[Any], Any, Any]:
    """(the rows, the evaluators, the starting model or its path, the tokenizer) of a run, every refusal of the data
    or the options first (`UsageError`): the retain rows a strategy needs, the sources, a reference of other rows,
    the output folder, rows that fit no format; only then the starting model (trained into output_dir without
    `--model_name_or_path`)."""
    from ..output_folder import check_output_dir

    check_retain_needed(args, config)
    model_init_kwargs = model_options(args, config)
    text_format = config.text_format()
    data = load_run_data(args, args.eval_max_examples)
    evaluators = evaluators_of(limited(data, args.eval_max_examples), config, text_format)
    if args.run_evaluation and args.reference_eval:  # a reference of other rows is refused before any training
        MetricSuite(evaluators).check(args.reference_eval, **data.evaluation)
    check_output_dir(config.output_dir, config.overwrite_output_dir)
    check_sides(data, text_format)
    model, tokenizer = prepare_model(args, config, data, text_format, model_init_kwargs)
    return data, evaluators, model, tokenizer


def run_unlearn(args: UnlearnArguments, config: UnlearningConfig, command: str | None = None) -> UnlearningTrainer:
    """Train, save the weights, evaluate (eval.json) and write the model card; `command` (the command line that ran
    this) goes into the card, redacted (no token reaches the card: `erasus_hf.redaction`). Every refusal of the data
    or the options (`UsageError`) comes before any compute."""
    set_seed(config.seed)  # the same LoRA initialisation on every process and in every run
    data, evaluators, model, tokenizer = prepare_run(args, config)
    in_training = config.eval_strategy != "no"
    try:
        trainer = UnlearningTrainer(
            model,
            config,
            forget_dataset=data.forget,
            retain_dataset=data.retain,
            processing_class=tokenizer,
            evaluators=evaluators if in_training else None,
            evaluation_data=data.evaluation if in_training else None,
            evaluation_reference=args.reference_eval,
        )
    except RowFormatError as err:  # a format the tokenizer cannot render, found when the trainer prepares the rows
        raise UsageError(one_line(err)) from err
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
        result = MetricSuite(evaluators).run(
            unwrapped,
            tokenizer,
            **data.evaluation,
            reference=args.reference_eval,
            text_format=trainer.text_format,
            row_formats=trainer.row_formats,
        )
        result.meta["reference"] = args.reference_eval
        result.meta["data"] = dict(data.sources)
        trainer.log({f"final_{k}": v for k, v in result.summary.items()})
        if trainer.args.should_save:
            result.save(os.path.join(config.output_dir, "eval.json"))
    trainer.create_model_card(evaluation=result, command=command, datasets=data.hub_ids or None)
    if trainer.args.should_save:
        print(redact(f"[rank {rank}] wrote {config.output_dir}: {', '.join(sorted(os.listdir(config.output_dir)))}"))
        if result is not None:  # the run's last lines: its final metrics
            print(redact(summary_table(result.summary, os.path.join(config.output_dir, "eval.json"))))
    return trainer
