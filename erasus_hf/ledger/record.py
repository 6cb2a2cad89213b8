"""The deletion ledger: what was forgotten, when, how and with what result, one entry per request, as JSON.

Schema ``erasus_hf.deletion_ledger`` version 1 (`LEDGER_VERSION`), written as ``{"schema", "version", "base_model",
"base_sha256", "mode", "reference", "merge_every", "created", "updated", "requests": [...], "merges": [...]}``:

- ``mode``: ``"adapter"`` (each request trains its own LoRA adapter on top of the model as it stands) or ``"full"``
  (each request fine-tunes every weight; the ledger alone keeps the requests apart).
- ``reference``: what a request's reference model is: ``"previous"`` (the model after the previous request, as
  MUSE's sequential experiments run it: each request starts from the last unlearned model and its NPO/KL reference
  is that model) or ``"original"`` (the model before any request).
- ``requests``: one `RequestRecord` each, in the order applied. Its rows enter only as fingerprints: the SHA-256 of
  each row's canonical line (`data.fingerprint.canonical_line` of the columns its format reads, under the format's
  field names), and the request's fingerprint, the SHA-256 of its rows' sorted distinct digests (so the same rows in
  another order, or with other extra columns, are the same request). Never the text.
- ``merges``: with ``merge_every=N`` (adapter mode), after every N-th request the adapters so far are merged into a
  full model (`MergeRecord`); later requests stack on it.

The ledger file is replaced atomically (a temporary file beside it, then `os.replace`): a reader sees the old ledger
or the new one, never half of one. Artifacts the ledger does not name (a request interrupted after its folder was
written) are not part of the state.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..data.fingerprint import canonical_line
from ..data.formats import FORMAT_FIELDS, TextFormat
from ..redaction import redact_json

LEDGER_SCHEMA = "erasus_hf.deletion_ledger"
LEDGER_VERSION = 1
LEDGER_FILE = "ledger.json"
MODES = ("adapter", "full")
REFERENCES = ("previous", "original")


class RequestError(ValueError):
    """A request, a ledger or an option that cannot be applied as given, found before any compute; the message names
    what to change (`erasus-hf forget` prints it as one line)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RowDigests:
    """A request's rows as fingerprints: `fingerprint` (of the whole request), `rows` (how many were given),
    `row_sha256` (the sorted distinct per-row digests) and the row `format`."""

    fingerprint: str
    rows: int
    row_sha256: tuple[str, ...]
    format: str


def row_digests(rows: Iterable[Mapping[str, Any]], text_format: TextFormat | None = None) -> RowDigests:
    """The fingerprints of `rows` (module doc): each row's format found as the trainer finds it; rows of mixed
    formats are refused, naming the first row that differs."""
    text_format = text_format or TextFormat()
    digests, kind, count = set(), None, 0
    for index, row in enumerate(rows):
        row_kind = text_format.detect(row, "request")
        if kind is None:
            kind = row_kind
        elif row_kind != kind:
            raise RequestError(
                f"Row {index} of the request is a {row_kind} row, row 0 a {kind} row: give one format per request."
            )
        names = [n for n in FORMAT_FIELDS[kind] if text_format.column(n) in row]
        canonical = {n: row[text_format.column(n)] for n in names}
        digests.add(hashlib.sha256(canonical_line(canonical, index, "request")).hexdigest())
        count += 1
    if count == 0:
        raise RequestError("The request has no rows: there is nothing to forget.")
    ordered = tuple(sorted(digests))
    fingerprint = hashlib.sha256("\n".join(ordered).encode()).hexdigest()
    return RowDigests(fingerprint, count, ordered, kind)


@dataclass
class RequestRecord:
    """One applied request. `artifact`: its folder, relative to the ledger's (the adapter, or the full model);
    `applied_as`: "adapter" (stacked on the earlier ones) or "full"; `state_sha256`: the SHA-256 of every weight of
    the model after it (merged), what a replay must reproduce; `evaluation`: the request's numbers before and after;
    `verification`: the verifier's summary when a holdout was given; `config`: the `UnlearningConfig` fields that
    differ from the defaults (secrets redacted), from which a replay rebuilds the run."""

    id: str
    index: int
    time: str
    fingerprint: str
    rows: int
    distinct_rows: int
    row_format: str
    row_sha256: list[str]
    strategy: dict[str, Any]
    config: dict[str, Any]
    artifact: str
    applied_as: str
    state_sha256: str
    seconds: float
    source: str | None = None
    overlap: dict[str, int] = field(default_factory=dict)
    retain: dict[str, Any] | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] | None = None


@dataclass
class MergeRecord:
    """The adapters of the requests up to `after_request` merged into one full model at `artifact`."""

    after_request: str
    artifact: str
    state_sha256: str
    time: str


@dataclass
class DeletionLedger:
    """The ledger of one run folder (`path` is its ``ledger.json``; module doc for the fields).

    `DeletionLedger(path, base_model=..., base_sha256=...)` starts one (`apply.open_ledger` does it for a model),
    `DeletionLedger.load(path)` reads one, `save()` writes it atomically."""

    path: str
    base_model: str
    base_sha256: str
    mode: str = "adapter"
    reference: str = "previous"
    merge_every: int | None = None
    created: str = field(default_factory=now)
    updated: str | None = None
    requests: list[RequestRecord] = field(default_factory=list)
    merges: list[MergeRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = os.path.abspath(self.path)
        if self.mode not in MODES:
            raise RequestError(f"The ledger's mode must be one of {MODES}, got {self.mode!r}.")
        if self.reference not in REFERENCES:
            raise RequestError(f"The ledger's reference must be one of {REFERENCES}, got {self.reference!r}.")
        if self.merge_every is not None:
            if isinstance(self.merge_every, bool) or not isinstance(self.merge_every, int) or self.merge_every < 1:
                raise RequestError(f"merge_every must be a positive number of requests, got {self.merge_every!r}.")
            if self.mode == "full":
                raise RequestError("merge_every merges adapters; a ledger of full fine-tuning (mode 'full') has none.")

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    @classmethod
    def load(cls, path: str) -> DeletionLedger:
        """Read a ledger; one of another schema or a newer version is refused, naming the file."""
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise RequestError(f"{path} is not a deletion ledger: not valid JSON ({err}).") from err
        if not isinstance(data, dict) or data.get("schema") != LEDGER_SCHEMA:
            data = data if isinstance(data, dict) else {}
            schema = data.get("schema")
            raise RequestError(f"{path} is not a deletion ledger (schema {schema!r}, not {LEDGER_SCHEMA}).")
        if data.get("version") != LEDGER_VERSION:
            raise RequestError(
                f"{path} is a version {data.get('version')} ledger; this erasus_hf reads version {LEDGER_VERSION}."
            )
        known = {f.name for f in fields(cls)} - {"path"}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["requests"] = [RequestRecord(**r) for r in data.get("requests", [])]
            values["merges"] = [MergeRecord(**m) for m in data.get("merges", [])]
        except TypeError as err:
            raise RequestError(f"{path}: a request or merge entry does not fit the schema ({err}).") from err
        return cls(path=path, **values)

    def to_dict(self) -> dict[str, Any]:
        data = {"schema": LEDGER_SCHEMA, "version": LEDGER_VERSION}
        data.update({k: v for k, v in asdict(self).items() if k != "path"})
        return redact_json(data)

    def save(self) -> None:
        """Write the ledger atomically (a temporary file beside it, flushed, then `os.replace`)."""
        self.updated = now()
        os.makedirs(self.folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".ledger-", suffix=".json", dir=self.folder)
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    # ---- queries ----

    def find(self, fingerprint: str) -> RequestRecord | None:
        """The request applied with this fingerprint, if any."""
        return next((r for r in self.requests if r.fingerprint == fingerprint), None)

    def overlap(self, digests: RowDigests) -> dict[str, int]:
        """Earlier request id -> how many of these rows it held (only requests sharing rows)."""
        mine = set(digests.row_sha256)
        shared = {r.id: len(mine & set(r.row_sha256)) for r in self.requests}
        return {rid: n for rid, n in shared.items() if n}

    def next_id(self) -> str:
        return f"request-{len(self.requests) + 1:04d}"

    def artifact_path(self, relative: str) -> str:
        return os.path.join(self.folder, relative)

    def stack(self) -> tuple[str, list[RequestRecord]]:
        """(the full model the current state starts from, the requests stacked on it in order): the original model
        or the last merge, then every later request's adapter; in full mode, the last request's model alone."""
        if self.mode == "full":
            return (self.artifact_path(self.requests[-1].artifact) if self.requests else self.base_model), []
        start, after = self.base_model, 0
        if self.merges:
            last = self.merges[-1]
            start = self.artifact_path(last.artifact)
            after = next(r.index for r in self.requests if r.id == last.after_request)
        return start, [r for r in self.requests if r.index > after]

    def describe(self) -> str:
        """The markdown of the card: one row per request."""
        lines = [
            f"Deletion requests applied: {len(self.requests)} (mode {self.mode}, reference {self.reference}"
            + (f", adapters merged every {self.merge_every} requests" if self.merge_every else "")
            + f"), from `{self.base_model}`. Rows enter the ledger only as SHA-256 fingerprints.",
            "",
            "| request | time (UTC) | rows | fingerprint | strategy | forget NLL before → after | verification | "
            "artifact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.requests:
            before, after = (r.evaluation.get(f"forget_nll_{when}") for when in ("before", "after"))
            nll = f"{before:.3f} → {after:.3f}" if before is not None and after is not None else "—"
            verified = "—"
            if r.verification is not None:
                rejected = r.verification.get("rejected_after_holm", [])
                verified = f"{len(rejected)} of {r.verification.get('checks', 0)} checks distinguishable (Holm)"
            lines.append(
                f"| {r.id} | {r.time} | {r.rows} | `{r.fingerprint[:12]}` | {r.strategy.get('name')} | {nll} | "
                f"{verified} | `{r.artifact}` ({r.applied_as}) |"
            )
        for m in self.merges:
            lines.append(f"\nAdapters up to {m.after_request} merged into `{m.artifact}`.")
        return "\n".join(lines)
