"""`erasus-hf verify`: the statistical verification of an unlearned model (`erasus_hf.verification`), written as a
JSON and printed as the markdown of the card.

    erasus-hf verify --model unlearned --forget_dataset_name forget01.json --holdout_dataset_name holdout01.json \\
        --retrained retain_model --output verification.json
    erasus-hf verify --model unlearned --forget_dataset_name forget01.json --holdout_dataset_name holdout01.json \\
        --retrained retain_eval.json --reference_out_models retain_seed1 retain_seed2 --reference_in_models full_seed1

Members are the forget rows; the nulls are the holdout rows (never trained on: for TOFU, rows of authors never
trained on) and the retrained model: a model folder (every check, relearning included) or the evaluation JSON that
`erasus-hf evaluate --benchmark mia` wrote for it on the same rows (the score checks). The reference models of the
likelihood-ratio audit are folders of models trained the same way on every forget row (`--reference_in_models`) or
on none (`--reference_out_models`, at least two).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.loading import DataSource
from ..evaluation.result import EvaluationResult
from ..hub.card import add_card_section
from ..model_source import check_model_source
from ..modeling.loading import load_model
from ..verification.lira import ReferenceModel
from ..verification.statistics import ALPHA
from ..verification.verifier import DEFAULT_ATTACKS, VERIFIABLE_ATTACKS, UnlearningVerifier, VerificationResult
from .data_options import (
    FORMAT_OPTIONS,
    FormatArguments,
    chat_template_option,
    merged_model_init_kwargs,
    model_init_field,
    text_format_of,
)
from .parsing import UsageError, make_parser, parse

DESCRIPTION = (
    "Verify an unlearned model: membership tests of the forget rows against a holdout never trained on and a "
    "retrained model, each with its statistic, p-value or interval and level; writes the verification JSON."
)

_ROWS_HELP = {
    "name": "The {what} rows, as TRL's --dataset_name: a .json/.jsonl/.parquet/.csv file, a folder or a Hub dataset "
    "id; question/answer rows or text rows.{extra}",
    "config": "The configuration of --{what}_dataset_name (load_dataset's name).",
    "split": "The split of --{what}_dataset_name, sliced as datasets slices one ('train[:100]'); default 'train'.",
}
_EXTRA = {
    "forget": " The members: the rows the model was asked to forget.",
    "holdout": " The non-members: rows the model (and the retrained model) never trained on, of the same kind as the "
    "forget rows (for TOFU: rows of other fictitious authors). Never the retain rows: they are training members too.",
}


ROW_OPTIONS = tuple(f"{side}_dataset_{part}" for side in ("forget", "holdout") for part in ("name", "config", "split"))
OPTION_GROUPS = {
    "rows": (
        "The members (the forget rows) and the non-members (the holdout rows), and how they become tokens (as the "
        "model was trained: the options of `erasus-hf unlearn`).",
        (*ROW_OPTIONS, "max_length", *FORMAT_OPTIONS),
    )
}
"""`make_parser`'s groups of `erasus-hf verify`."""


def _rows_field(what: str, part: str, required: bool = False) -> Any:
    help_text = _ROWS_HELP[part].format(what=what, extra=_EXTRA[what] if part == "name" else "")
    if required:
        return field(metadata={"help": help_text})
    return field(default=None, metadata={"help": help_text})


@dataclass
class VerifyArguments:
    model: str = field(
        metadata={"help": "The model to verify: a Hub id or a folder (a full model or a PEFT adapter)."}
    )
    forget_dataset_name: str = _rows_field("forget", "name", required=True)
    holdout_dataset_name: str = _rows_field("holdout", "name", required=True)
    forget_dataset_config: str | None = _rows_field("forget", "config")
    forget_dataset_split: str | None = _rows_field("forget", "split")
    holdout_dataset_config: str | None = _rows_field("holdout", "config")
    holdout_dataset_split: str | None = _rows_field("holdout", "split")
    retrained: str | None = field(
        default=None,
        metadata={
            "help": "The retrained model (trained without the forget rows: the retain model): its folder (every "
            "check, relearning included) or its evaluation JSON from `erasus-hf evaluate --benchmark mia` on the same "
            "forget and holdout rows."
        },
    )
    control: str | None = field(
        default=None,
        metadata={
            "help": "A second model trained without the forget rows (another seed), folder or evaluation JSON: the "
            "checks against retraining are run for it too, and a check it fails as well is marked as one training "
            "randomness alone fails. Default: the first --reference_out_models folder."
        },
    )
    reference_in_models: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reference models of the likelihood-ratio audit trained (like the model) on every forget row."
        },
    )
    reference_out_models: list[str] | None = field(
        default=None,
        metadata={"help": "Reference models trained the same way on none of the forget rows (at least two)."},
    )
    alpha: float = field(default=ALPHA, metadata={"help": "The significance level of every check."})
    attacks: list[str] = field(
        default_factory=lambda: list(DEFAULT_ATTACKS),
        metadata={"help": f"MIA scores of the population checks, any of: {', '.join(VERIFIABLE_ATTACKS)}."},
    )
    fprs: list[float] = field(
        default_factory=lambda: [0.01, 0.001], metadata={"help": "Low FPRs at which the TPR is reported."}
    )
    lira_fpr: float = field(default=0.05, metadata={"help": "The FPR at which the audit counts a row identified."})
    relearn_steps: list[int] = field(
        default_factory=lambda: [4, 8, 16],
        metadata={"help": "The relearning test's step grid (with a retrained model folder); none: --relearn_steps 0."},
    )
    relearn_learning_rate: float = field(default=1e-4, metadata={"help": "The relearning test's learning rate."})
    max_examples: int | None = field(default=None, metadata={"help": "Verify only the first N rows of each side."})
    batch_size: int = field(default=32, metadata={"help": "Examples per forward pass."})
    bootstrap_resamples: int = field(default=1000, metadata={"help": "Resamples of every bootstrap interval."})
    seed: int = field(default=0, metadata={"help": "Seed of the bootstraps and the random splits."})
    output: str = field(default="verification.json", metadata={"help": "Where the verification JSON goes."})
    update_card: bool = field(
        default=True,
        metadata={
            "help": "When --model is a folder holding an erasus-hf model card (README.md), add the result to it under "
            "'Guarantees and verification' (a later verification replaces it). --no_update_card leaves it."
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of an adapter (default: the adapter config's base model)."}
    )
    dtype: str | None = model_init_field("dtype")
    attn_implementation: str | None = model_init_field("attn_implementation")
    trust_remote_code: bool = model_init_field("trust_remote_code")
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ...; default: cuda when available."})


def _rows(args: VerifyArguments, what: str) -> Any:
    name, config, split = (getattr(args, f"{what}_dataset_{part}") for part in ("name", "config", "split"))
    flags = tuple(f"--{what}_dataset_{part}" for part in ("name", "config", "split"))
    rows = DataSource(name, config, split or "train", flags).load()
    return rows.select(range(min(len(rows), args.max_examples))) if args.max_examples else rows


def _check_source(path: str, option: str) -> None:
    """A folder (a model) or a JSON file (an evaluation) that exists; refused naming `option` otherwise."""
    if os.path.isfile(path):
        if not path.endswith(".json"):
            raise UsageError(f"{option} {path!r}: a file must be an evaluation JSON (erasus-hf evaluate --output).")
        return
    try:
        check_model_source(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"{option} {path!r}: {err}") from err


def _load_source(
    path: str, option: str, kwargs: dict | None, tokenizer: Any, device: Any
) -> nn.Module | EvaluationResult:
    if os.path.isfile(path):
        return EvaluationResult.load(path)
    model, other = load_model(path, model_init_kwargs=kwargs)
    if other.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"{option} {path!r}: its tokenizer differs from the verified model's; the scores of two models compare "
            "only under one tokenizer."
        )
    return model.to(device).eval()


def run_verify(args: VerifyArguments, formats: Any = None) -> VerificationResult:
    """Verify `args.model` and write the JSON (see the module doc); every option is checked, and every evaluation JSON
    compared with the rows, before a model is loaded."""
    formats = formats if formats is not None else FormatArguments()
    text_format = text_format_of(formats)
    check_model_source(args.model, args.base_model)
    sources = {
        "--retrained": [args.retrained] if args.retrained else [],
        "--control": [args.control] if args.control else [],
    }
    sources["--reference_in_models"] = list(args.reference_in_models or [])
    sources["--reference_out_models"] = list(args.reference_out_models or [])
    for option, paths in sources.items():
        for path in paths:
            _check_source(path, option)
    forget, holdout = _rows(args, "forget"), _rows(args, "holdout")
    steps = tuple(s for s in args.relearn_steps if s != 0)
    references = [(p, True) for p in sources["--reference_in_models"]] + [
        (p, False) for p in sources["--reference_out_models"]
    ]
    try:
        verifier = UnlearningVerifier(
            forget,
            holdout,
            alpha=args.alpha,
            attacks=args.attacks,
            fprs=args.fprs,
            lira_fpr=args.lira_fpr,
            relearn_steps=steps,
            relearn_learning_rate=args.relearn_learning_rate,
            bootstrap_resamples=args.bootstrap_resamples,
            seed=args.seed,
            batch_size=args.batch_size,
            max_length=formats.max_length,
            text_format=text_format,
        )
        for option, paths in sources.items():
            for path in paths:
                if os.path.isfile(path):
                    attacks = (verifier.lira_attack,) if option.startswith("--reference") else verifier.attacks
                    verifier.check_evaluation(EvaluationResult.load(path), attacks, f"{option} {path}")
    except ValueError as err:
        raise UsageError(
            f"--forget_dataset_name / --holdout_dataset_name and the verification options: {err}"
        ) from err
    if references and len(sources["--reference_out_models"]) < 2:
        raise UsageError(
            f"--reference_out_models: the likelihood-ratio audit needs at least two models trained without the forget "
            f"rows, got {len(sources['--reference_out_models'])}; add more (or give no reference model to skip it)."
        )

    kwargs = merged_model_init_kwargs(args, None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, args.base_model, model_init_kwargs=kwargs)
    if formats.chat_template_path is not None:
        tokenizer.chat_template = chat_template_option(formats)
    model.to(device).eval()
    loaded = {
        option: [_load_source(p, option, kwargs, tokenizer, device) for p in paths]
        for option, paths in sources.items()
    }
    reference_sources = loaded["--reference_in_models"] + loaded["--reference_out_models"]
    verifier = dataclasses.replace(
        verifier,
        references=[
            ReferenceModel(source, members, name=path)
            for source, (path, members) in zip(reference_sources, references, strict=True)
        ],
    )
    retrained = loaded["--retrained"][0] if loaded["--retrained"] else None
    control = loaded["--control"][0] if loaded["--control"] else None
    result = verifier.verify(model, tokenizer, retrained=retrained, control=control)
    result.meta.update(
        {
            "model_path": args.model,
            "retrained_path": args.retrained,
            "control_path": args.control,
            "data": {
                "forget": DataSource(args.forget_dataset_name, args.forget_dataset_config).describe(),
                "holdout": DataSource(args.holdout_dataset_name, args.holdout_dataset_config).describe(),
            },
        }
    )
    result.save(args.output)
    card = add_card_section(args.model, result.describe(), key="verify") if args.update_card else None
    print(result.describe())
    if card is not None:
        print(f"added to the model card {card}")
    return result


def main(argv: list[str] | None = None) -> int:
    """`erasus-hf verify ARGS` (what `erasus_hf.cli` runs for the `verify` command)."""
    import sys

    from ..data.loading import DataSourceError

    parser = make_parser((VerifyArguments, FormatArguments), "erasus-hf verify", DESCRIPTION, OPTION_GROUPS)
    args, formats = parse(parser, list(sys.argv[1:] if argv is None else argv))
    try:
        run_verify(args, formats)
    except (UsageError, DataSourceError) as err:
        parser.error(str(err))
    return 0
