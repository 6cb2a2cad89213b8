"""Applying deletion requests one after another: `open_ledger`, `apply_request`, `replay`.

A run folder holds the ledger (``ledger.json``), its card (``README.md``), one folder per request under
``requests/<id>/`` (the request's LoRA adapter, or in full mode the whole model; its own card, ``eval.json`` and,
with a holdout, ``verification.json``) and, with ``merge_every``, the merged models under ``merges/<id>/``.

What a request does, in order: fingerprint its rows (a request already in the ledger is a no-op; one that shares rows
with earlier requests says how many); check every input (rows, holdout, options) before any compute; rebuild the
model as the ledger leaves it (`state.load_state`); score the request's rows on it; unlearn them with
`UnlearningTrainer` into a pending folder; score them again and verify (the `UnlearningVerifier` against the holdout
when one is given); move the pending folder into place; merge when due; and only then write the ledger. An
interruption at any point before that last write leaves the ledger and the model it describes as they were; the
folders it left are removed by the next request.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from datasets import Dataset
from huggingface_hub import ModelCard
from torch import nn

from ..config import UnlearningConfig
from ..data.validation import check_rows, to_dataset
from ..evaluation.rows import RowsEvaluator
from ..hub.card import write_model_card
from ..model_source import load_causal_lm
from ..trainer import UnlearningTrainer
from .record import (
    LEDGER_FILE,
    DeletionLedger,
    MergeRecord,
    RequestError,
    RequestRecord,
    RowDigests,
    now,
    row_digests,
)
from .state import load_state, state_sha256

logger = logging.getLogger(__name__)

REQUESTS_DIR = "requests"
MERGES_DIR = "merges"
PENDING = ".pending-"
CARD = "README.md"
# UnlearningConfig fields a request sets itself: where it writes, and that it writes once, unmerged, unpushed
RUN_FIELDS = ("output_dir", "logging_dir", "save_strategy", "merge_adapter", "push_to_hub", "overwrite_output_dir")


@dataclass
class RequestOutcome:
    """What `apply_request` did: `applied` False for a request already in the ledger (`record` is then the earlier
    one); `message` the sentence to show; `trainer` the run's trainer (None when nothing ran)."""

    record: RequestRecord
    applied: bool
    message: str
    trainer: UnlearningTrainer | None = None


def ledger_path(path: str) -> str:
    """A run folder or a ledger file, as the ledger file's path."""
    return path if path.endswith(".json") else os.path.join(path, LEDGER_FILE)


def open_ledger(
    path: str,
    base_model: str | None = None,
    mode: str | None = None,
    reference: str | None = None,
    merge_every: int | None = None,
) -> DeletionLedger:
    """The ledger at `path` (a run folder or its ``ledger.json``), or a new one there for `base_model`.

    An existing ledger keeps its base model, mode, reference and merge interval; a value given that differs from
    the recorded one is refused (a run folder is one sequence of requests on one model)."""
    path = ledger_path(path)
    given = {"base_model": base_model, "mode": mode, "reference": reference, "merge_every": merge_every}
    if os.path.exists(path):
        ledger = DeletionLedger.load(path)
        recorded = {"base_model": ledger.base_model, "mode": ledger.mode, "reference": ledger.reference}
        recorded["merge_every"] = ledger.merge_every
        for name, value in given.items():
            if name == "base_model" and value is not None and _same_path(value, ledger.base_model):
                continue
            if value is not None and value != recorded[name]:
                raise RequestError(
                    f"{path} records {name}={recorded[name]!r}; this request asks for {value!r}. A ledger is one "
                    "sequence of requests on one model: drop the option, or start a new run folder."
                )
        return ledger
    if base_model is None:
        raise RequestError(
            f"{path} does not exist yet: the first request needs the model to unlearn from (model_name_or_path)."
        )
    if os.path.isdir(base_model):
        base_model = os.path.abspath(base_model)
    model, _ = load_causal_lm(base_model)
    return DeletionLedger(
        path=path,
        base_model=base_model,
        base_sha256=state_sha256(model),
        mode=mode or "adapter",
        reference=reference or "previous",
        merge_every=merge_every,
    )


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) if os.path.isdir(a) else a == b


def config_overrides(args: UnlearningConfig) -> dict[str, Any]:
    """The `UnlearningConfig` fields of `args` that differ from their defaults, without the ones a request sets
    itself (`RUN_FIELDS`): what the ledger records and `replay` rebuilds the run from (`to_dict` masks tokens)."""
    default = type(args)(output_dir=args.output_dir).to_dict()
    return {
        k: v
        for k, v in args.to_dict().items()
        if default.get(k) != v and k not in RUN_FIELDS and not k.endswith("_token")
    }


def remove_leftovers(ledger: DeletionLedger) -> list[str]:
    """Remove what interrupted requests left (pending folders, request or merge folders the ledger does not
    name); returns their paths. Nothing the ledger names is touched."""
    named = {os.path.normpath(r.artifact) for r in ledger.requests}
    named |= {os.path.normpath(m.artifact) for m in ledger.merges}
    removed = []
    if not os.path.isdir(ledger.folder):
        return removed
    candidates = [n for n in os.listdir(ledger.folder) if n.startswith(PENDING)]
    for sub in (REQUESTS_DIR, MERGES_DIR):
        where = os.path.join(ledger.folder, sub)
        if os.path.isdir(where):
            candidates += [os.path.join(sub, n) for n in os.listdir(where) if os.path.join(sub, n) not in named]
    for relative in candidates:
        path = os.path.join(ledger.folder, relative)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.warning("Removed %s: an interrupted request's files, not in the ledger.", path)
    return removed


def _check_mode(ledger: DeletionLedger, args: UnlearningConfig) -> None:
    wants_adapter = ledger.mode == "adapter"
    if bool(args.use_peft) != wants_adapter:
        raise RequestError(
            f"The ledger {ledger.path} applies requests in {ledger.mode!r} mode, so use_peft must be "
            f"{wants_adapter}; got use_peft={args.use_peft}."
        )
    if args.coreset is not None:
        raise RequestError("A deletion request is unlearned on all its rows: coreset must be None.")
    if args.push_to_hub:
        raise RequestError(
            "push_to_hub: a ledger run pushes nothing itself. Once the request is in the ledger, push the merged "
            f"model (merge_every=N writes it) with `erasus-hf push {os.path.join(ledger.folder, MERGES_DIR)}/<id> "
            "--repo_id ...`."
        )
    if args.merge_adapter:
        raise RequestError("merge_adapter: a ledger keeps one adapter per request; merge them with merge_every=N.")


def _evaluation(rows: Mapping[str, Dataset], args: UnlearningConfig) -> RowsEvaluator:
    return RowsEvaluator(
        rows, args.text_format(), max_length=args.max_length, batch_size=args.per_device_eval_batch_size
    )


def _numbers(before: Any, after: Any) -> dict[str, float]:
    """``{split}_{metric}_before`` / ``_after`` of the rows evaluator's summaries."""
    out = {}
    for when, result in (("before", before), ("after", after)):
        for key, value in result.summary.items():
            out[f"{key.split('/', 1)[1]}_{when}"] = float(value)
    return out


def apply_request(
    ledger: DeletionLedger,
    forget: Dataset | Sequence[Mapping[str, Any]],
    args: UnlearningConfig,
    *,
    retain: Dataset | Sequence[Mapping[str, Any]] | None = None,
    holdout: Dataset | Sequence[Mapping[str, Any]] | None = None,
    source: str | None = None,
    verifier_kwargs: Mapping[str, Any] | None = None,
    callbacks: list | None = None,
) -> RequestOutcome:
    """Unlearn `forget` (one deletion request) from the model as `ledger` leaves it and record it (module doc).

    `args` is the run's `UnlearningConfig` (strategy, learning rate, epochs, `use_peft` = the ledger's mode; its
    `output_dir` is replaced by the request's folder). `retain`: the rows to keep (for strategies with a retain
    term). `holdout`: rows never trained on, in the forget rows' format; with them the request is verified by
    `UnlearningVerifier(forget, holdout, **verifier_kwargs)`, else scored by its rows' NLL and memorization alone.
    `source`: where the rows came from, for the record (a file name; never the rows)."""
    from ..verification import UnlearningVerifier

    text_format = args.text_format()
    try:  # rows of one shape, every value of its type: refused here, not after the model has loaded
        forget = to_dataset(forget, "forget")
        check_rows(forget, "forget", text_format)
        if retain is not None:
            retain = to_dataset(retain, "retain")
            check_rows(retain, "retain", text_format)
    except ValueError as err:
        raise RequestError(str(err)) from err
    digests = row_digests(forget, text_format)
    earlier = ledger.find(digests.fingerprint)
    if earlier is not None:
        message = (
            f"This request ({digests.rows} rows, fingerprint {digests.fingerprint[:12]}) was applied already as "
            f"{earlier.id} on {earlier.time}; nothing was done."
        )
        return RequestOutcome(earlier, False, message)
    _check_mode(ledger, args)
    overlap = ledger.overlap(digests)
    retain_digests = row_digests(retain, text_format) if retain is not None else None
    verifier = None
    if holdout is not None:  # its rows are checked now (formats, overlap with the forget rows), before any compute
        kwargs = {"text_format": text_format, "max_length": args.max_length, "seed": args.seed}
        try:
            verifier = UnlearningVerifier(
                forget, to_dataset(holdout, "holdout"), **{**kwargs, **(verifier_kwargs or {})}
            )
        except ValueError as err:
            raise RequestError(f"The holdout rows of this request: {err}") from err
    remove_leftovers(ledger)

    request_id = ledger.next_id()
    artifact = os.path.join(REQUESTS_DIR, request_id)
    pending = os.path.join(ledger.folder, f"{PENDING}{request_id}")
    model, tokenizer = load_state(ledger, merged=True)
    ref_model = _original(ledger) if ledger.reference == "original" and ledger.requests else None
    sides = {"forget": forget, **({"retain": retain} if retain is not None else {})}
    before = _evaluation(sides, args).evaluate(model, tokenizer)
    run_args = replace(args, output_dir=pending, save_strategy="no", merge_adapter=False, push_to_hub=False)
    start = time.perf_counter()
    try:
        trainer = UnlearningTrainer(
            model, run_args, forget_dataset=forget, retain_dataset=retain, ref_model=ref_model,
            processing_class=tokenizer, callbacks=callbacks,
        )  # fmt: skip
        trainer.train()
        seconds = time.perf_counter() - start
        trainer.save_model()
        unlearned = trainer.accelerator.unwrap_model(trainer.model)
        after = _evaluation(sides, args).evaluate(unlearned, tokenizer)
        after.save(os.path.join(pending, "eval.json"))
        verification = None
        if verifier is not None:
            result = verifier.verify(unlearned, tokenizer)
            result.save(os.path.join(pending, "verification.json"))
            family = result.meta.get("family", {})
            verification = {
                "file": os.path.join(artifact, "verification.json"),
                "checks": len(result.checks),
                "rejected": result.rejected,
                "rejected_after_holm": family.get("holm_rejected", []),
                "alpha": verifier.alpha,
                "holdout_rows": len(verifier.holdout),
            }
        guarantees = [result.describe()] if verifier is not None else []
        title = f"{request_id} of a deletion ledger"
        trainer.create_model_card(model_name=title, evaluation=after, guarantees=guarantees)
        os.makedirs(os.path.join(ledger.folder, REQUESTS_DIR), exist_ok=True)
        os.rename(pending, ledger.artifact_path(artifact))
    finally:
        shutil.rmtree(pending, ignore_errors=True)  # an interrupted or failed request leaves nothing behind

    record = RequestRecord(
        id=request_id,
        index=len(ledger.requests) + 1,
        time=now(),
        fingerprint=digests.fingerprint,
        rows=digests.rows,
        distinct_rows=len(digests.row_sha256),
        row_format=digests.format,
        row_sha256=list(digests.row_sha256),
        strategy={"name": trainer.strategy.name, "paper": trainer.strategy.paper, **trainer.strategy.hyperparameters},
        config=config_overrides(args),
        artifact=artifact,
        applied_as=ledger.mode,
        state_sha256="",
        seconds=round(seconds, 3),
        source=source,
        overlap=overlap,
        retain=_described(retain_digests),
        evaluation=_numbers(before, after),
        verification=verification,
    )
    updated = copy.deepcopy(ledger)
    updated.requests.append(record)
    merged_state, _ = load_state(updated, merged=True)
    record.state_sha256 = state_sha256(merged_state)
    if ledger.mode == "adapter" and ledger.merge_every and record.index % ledger.merge_every == 0:
        updated.merges.append(_merge(updated, merged_state, tokenizer, request_id, record.state_sha256))
    updated.save()  # the commit point: from here on the request is part of the state
    ledger.requests, ledger.merges, ledger.updated = updated.requests, updated.merges, updated.updated
    write_ledger_card(ledger)
    message = f"Applied {request_id}: {digests.rows} rows ({digests.format}), {trainer.strategy.name}, " + (
        f"forget NLL {record.evaluation['forget_nll_before']:.3f} -> {record.evaluation['forget_nll_after']:.3f}"
    )
    if verification is not None:
        told = len(verification["rejected_after_holm"])
        message += f"; verified: {told} of {verification['checks']} checks tell its rows from the holdout (Holm)"
    if overlap:
        message += "; " + ", ".join(f"{n} of its rows were in {rid}" for rid, n in overlap.items())
    return RequestOutcome(record, True, message, trainer)


def _original(ledger: DeletionLedger) -> nn.Module:
    model, _ = load_causal_lm(ledger.base_model)
    return model.eval().requires_grad_(False)


def _described(digests: RowDigests | None) -> dict[str, Any] | None:
    if digests is None:
        return None
    return {"fingerprint": digests.fingerprint, "rows": digests.rows, "format": digests.format}


def _merge(ledger: DeletionLedger, model: nn.Module, tokenizer: Any, request_id: str, sha: str) -> MergeRecord:
    """Save the merged state after `request_id` under ``merges/<id>`` (written aside, then renamed into place)."""
    artifact = os.path.join(MERGES_DIR, request_id)
    pending = os.path.join(ledger.folder, f"{PENDING}merge-{request_id}")
    try:
        model.save_pretrained(pending)
        tokenizer.save_pretrained(pending)
        os.makedirs(os.path.join(ledger.folder, MERGES_DIR), exist_ok=True)
        os.rename(pending, ledger.artifact_path(artifact))
    finally:
        shutil.rmtree(pending, ignore_errors=True)
    return MergeRecord(after_request=request_id, artifact=artifact, state_sha256=sha, time=now())


def write_ledger_card(ledger: DeletionLedger) -> None:
    """The run folder's README.md: the ledger's table (`DeletionLedger.describe`), written atomically."""
    header = "---\nlibrary_name: erasus-hf\ntags:\n- erasus-hf\n- unlearning\n- deletion-ledger\n"
    if not os.path.isdir(ledger.base_model):
        header += f"base_model: {ledger.base_model}\n"
    text = (
        f"{header}---\n\n# Deletion ledger\n\n{ledger.describe()}\n\n"
        f"The model after every request: `erasus_hf.ledger.load_state(DeletionLedger.load('{LEDGER_FILE}'))` "
        "(`merged=False` keeps one adapter per request, stacked). Each request's folder holds its own card, "
        "`eval.json` and, when verified, `verification.json`.\n"
    )
    write_model_card(ModelCard(text), ledger.folder)


def replay(
    ledger: DeletionLedger,
    requests: Sequence[Dataset | Sequence[Mapping[str, Any]]],
    output_dir: str,
    *,
    retain: Dataset | Sequence[Mapping[str, Any]] | None = None,
    holdout: Dataset | Sequence[Mapping[str, Any]] | None = None,
) -> DeletionLedger:
    """Apply `ledger`'s requests again, from its original model, into a new run folder `output_dir`, each with the
    config it was recorded with; return the new ledger. `requests` are the rows of each request in order: every one
    is checked against the recorded fingerprint (and `retain` against the recorded retain rows) before any compute.
    On the same machine and versions the replayed states equal the recorded ones (`state_sha256`); a difference is
    reported as a warning per request."""
    if len(requests) != len(ledger.requests):
        raise RequestError(f"The ledger holds {len(ledger.requests)} requests; {len(requests)} row sets were given.")
    for number, (rows, record) in enumerate(zip(requests, ledger.requests, strict=True), 1):
        text_format = UnlearningConfig(output_dir=output_dir, **record.config).text_format()
        digests = row_digests(to_dataset(rows, "forget"), text_format)
        if digests.fingerprint != record.fingerprint:
            raise RequestError(
                f"Request {number} ({record.id}): these rows have fingerprint {digests.fingerprint[:12]}, the ledger "
                f"recorded {record.fingerprint[:12]}; give the rows of each request in the order applied."
            )
        if record.retain is not None:
            given = row_digests(to_dataset(retain, "retain"), text_format).fingerprint if retain is not None else None
            if given != record.retain["fingerprint"]:
                raise RequestError(f"Request {number} ({record.id}) was applied with other retain rows than these.")
    new = DeletionLedger(
        path=ledger_path(output_dir),
        base_model=ledger.base_model,
        base_sha256=ledger.base_sha256,
        mode=ledger.mode,
        reference=ledger.reference,
        merge_every=ledger.merge_every,
    )
    for rows, record in zip(requests, ledger.requests, strict=True):
        args = UnlearningConfig(output_dir=output_dir, **record.config)
        outcome = apply_request(new, rows, args, retain=retain if record.retain else None, holdout=holdout)
        if outcome.record.state_sha256 != record.state_sha256:
            logger.warning("Replayed %s differs from the recorded state (another machine or version?).", record.id)
    return new
