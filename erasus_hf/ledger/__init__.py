"""Deletion requests over time: a ledger of what was forgotten, one adapter per request, replay.

`open_ledger(run_dir, base_model=...)` opens or starts a run folder's ledger; `apply_request(ledger, rows, config)`
unlearns one request on top of the earlier ones and records it; `load_state(ledger)` rebuilds the model the ledger
describes; `replay(ledger, rows_per_request, new_dir)` applies the same requests again from the original model.
`erasus-hf forget` is the command line over them."""

from .apply import RequestOutcome, apply_request, open_ledger, remove_leftovers, replay, write_ledger_card
from .record import LEDGER_FILE, DeletionLedger, MergeRecord, RequestError, RequestRecord, RowDigests, row_digests
from .state import load_state, state_sha256

__all__ = [
    "LEDGER_FILE",
    "DeletionLedger",
    "MergeRecord",
    "RequestError",
    "RequestOutcome",
    "RequestRecord",
    "RowDigests",
    "apply_request",
    "load_state",
    "open_ledger",
    "remove_leftovers",
    "replay",
    "row_digests",
    "state_sha256",
    "write_ledger_card",
]
