"""`erasus-hf forget REQUEST_FILE [REQUEST_FILE ...] --output_dir RUN`: apply deletion requests one after another
and record each in the run folder's deletion ledger (`erasus_hf.ledger`).

    erasus-hf forget request-0001.jsonl --output_dir run --model_name_or_path finetuned --use_peft \\
        --strategy npo --retain_dataset_name retain.jsonl --holdout_dataset_name holdout.jsonl
    erasus-hf forget request-0002.jsonl --output_dir run --use_peft --strategy npo --retain_dataset_name retain.jsonl

The first request of a run folder names the model to unlearn from (`--model_name_or_path`); later ones read it from
the ledger. `--use_peft` trains one LoRA adapter per request (the ledger's mode `adapter`); without it each request
fine-tunes every weight (mode `full`). A request already in the ledger (the same rows, in any order) is a no-op;
every file is read and checked before the first request trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from ..config import UnlearningConfig
from ..data.loading import DataSource, one_line
from ..ledger import LEDGER_FILE, DeletionLedger, RequestError, RequestOutcome, apply_request, open_ledger, row_digests
from ..ledger.record import REFERENCES
from ..model_source import check_model_source, load_tokenizer
from .data_options import check_side
from .parsing import UsageError

DEFAULT_OUTPUT_DIR = "trainer_output"  # TrainingArguments' output_dir when none is given
DESCRIPTION = (
    "Apply deletion requests in order and record each in the run folder's deletion ledger (fingerprints of the rows, "
    "never the text; strategy, numbers before and after, verification, the adapter or model that applied it)."
)


@dataclass
class ForgetArguments:
    requests: list[str] = field(
        metadata={
            "help": "The request files, applied in the order given (also accepted as the first arguments): "
            ".json/.jsonl/.parquet/.csv files, folders or Hub dataset ids, rows of any format the trainer reads."
        }
    )
    request_split: str | None = field(
        default=None, metadata={"help": "The split of each request (default 'train', a file's only split)."}
    )
    ledger: str | None = field(
        default=None,
        metadata={"help": f"The ledger file (default OUTPUT_DIR/{LEDGER_FILE}); the request folders go beside it."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model to unlearn from, for the first request of a run folder (later requests read it from "
            "the ledger; given again, it must be the same)."
        },
    )
    retain_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The rows to keep, as TRL's --dataset_name (a file, a folder or a Hub id), for strategies with a "
            "retain term; the same rows for every request of a run (the ledger records their fingerprint)."
        },
    )
    retain_dataset_config: str | None = field(default=None, metadata={"help": "The retain rows' configuration."})
    retain_dataset_split: str | None = field(default=None, metadata={"help": "The retain rows' split."})
    holdout_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Rows never trained on, of the requests' kind: with them each request is verified "
            "(UnlearningVerifier, its result in the ledger and the request's card); without, its rows are scored "
            "before and after (NLL, exact memorization)."
        },
    )
    holdout_dataset_config: str | None = field(
        default=None, metadata={"help": "The configuration of the holdout rows."}
    )
    holdout_dataset_split: str | None = field(default=None, metadata={"help": "The split of the holdout rows."})
    merge_every: int | None = field(
        default=None,
        metadata={
            "help": "Adapter mode: merge the adapters into a full model (merges/<request>) after every N requests; "
            "later requests stack on it. Default: keep every adapter stacked. Set by the first request."
        },
    )
    request_reference: str | None = field(
        default=None,
        metadata={
            "help": "The reference model of each request: 'previous' (the model after the previous request, as "
            "MUSE's sequential runs use; the default) or 'original' (the model before any request). Set by the first "
            "request.",
            "choices": list(REFERENCES),
        },
    )


def positional_requests(argv: list[str]) -> list[str]:
    """`forget A.jsonl B.jsonl --x` -> `forget --requests A.jsonl B.jsonl --x`."""
    count = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    return ["--requests", *argv[:count], *argv[count:]] if count else argv


def _ledger_file(args: ForgetArguments, config: UnlearningConfig) -> str:
    """The ledger's path: `--ledger`, else OUTPUT_DIR/ledger.json. A ledger lives in its run folder, beside the
    requests it names, so a `--ledger` elsewhere than an `--output_dir` given is refused."""
    if args.ledger is None:
        return os.path.join(config.output_dir, LEDGER_FILE)
    folder = os.path.dirname(os.path.abspath(args.ledger))
    if config.output_dir != DEFAULT_OUTPUT_DIR and os.path.abspath(config.output_dir) != folder:
        raise UsageError(
            f"--ledger {args.ledger!r} is not in --output_dir {config.output_dir!r}: a ledger lives in its run "
            "folder, beside the requests it names; give one of the two, or the folder that holds the ledger."
        )
    return args.ledger


def _source(args: ForgetArguments, side: str) -> DataSource | None:
    name = getattr(args, f"{side}_dataset_name")
    config, split = getattr(args, f"{side}_dataset_config", None), getattr(args, f"{side}_dataset_split")
    flags = tuple(f"--{side}_dataset_{part}" for part in ("name", "config", "split"))
    return None if name is None else DataSource(name, config, split or "train", flags)


def _request_rows(args: ForgetArguments, text_format: Any, tokenizer: Any, holdout: Dataset | None) -> list:
    """(file, rows) of every request, each read and checked (its format, one format per request, the holdout rows
    disjoint from it) before any request trains."""
    from ..verification import UnlearningVerifier

    requests = []
    for name in args.requests:
        source = DataSource(name, None, args.request_split or "train", ("request", "--requests", "--request_split"))
        rows = source.load()
        where = f"request {name!r}"
        check_side(rows, "forget", where, text_format, tokenizer)
        try:
            row_digests(rows, text_format)
            if holdout is not None:
                UnlearningVerifier(rows, holdout, text_format=text_format)
        except ValueError as err:
            raise UsageError(f"{where}: {one_line(err)}") from err
        requests.append((name, rows))
    return requests


def _open(args: ForgetArguments, config: UnlearningConfig, path: str) -> DeletionLedger:
    try:
        return open_ledger(
            path,
            base_model=args.model_name_or_path,
            mode=None if os.path.exists(path) else ("adapter" if config.use_peft else "full"),
            reference=args.request_reference,
            merge_every=args.merge_every,
        )
    except RequestError as err:
        raise UsageError(one_line(err)) from err


def run_forget(args: ForgetArguments, config: UnlearningConfig) -> list[RequestOutcome]:
    """Apply every request of `args` in order (module doc) and return their outcomes. Every file and option is
    checked before the first request trains (`UsageError`)."""
    path = _ledger_file(args, config)
    config.output_dir = os.path.dirname(os.path.abspath(path))
    exists = os.path.exists(path)
    if not exists and args.model_name_or_path is None:
        raise UsageError(
            f"{path} does not exist yet: the first request of a run folder needs --model_name_or_path, the model to "
            "unlearn from."
        )
    if args.model_name_or_path is not None:
        try:
            check_model_source(args.model_name_or_path)
        except (OSError, ValueError) as err:
            raise UsageError(f"--model_name_or_path {args.model_name_or_path!r}: {one_line(err)}") from err
    ledger = _open(args, config, path) if exists else None  # an existing ledger reads cheaply; a new one hashes
    tokenizer = load_tokenizer(ledger.base_model if ledger else args.model_name_or_path)
    text_format = config.text_format()
    sides = {}
    for side in ("retain", "holdout"):
        source = _source(args, side)
        sides[side] = None if source is None else source.load()
        if source is not None:
            check_side(sides[side], side, source, text_format, tokenizer)
    requests = _request_rows(args, text_format, tokenizer, sides["holdout"])
    ledger = ledger or _open(args, config, path)
    outcomes = []
    for name, rows in requests:
        try:
            outcome = apply_request(ledger, rows, config, **sides, source=os.path.basename(name))
        except RequestError as err:  # found before this request's compute; the requests before it stand
            raise UsageError(f"request {name!r}: {one_line(err)}") from err
        print(f"{name}: {outcome.message}")
        outcomes.append(outcome)
    print(f"ledger: {ledger.path} ({len(ledger.requests)} requests)")
    return outcomes
