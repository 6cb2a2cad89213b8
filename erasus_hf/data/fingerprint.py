"""Fingerprints of rows: which exact rows a run trained on (the model card's forget set) or an evaluation scored
(`EvaluationResult.rows`, so that a reference evaluated on other rows is refused).

Canonical form of a row: ``json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))`` followed by
a newline, encoded as UTF-8. Key order inside a row does not matter; the set fingerprint is the SHA-256 (hex) of the
rows' canonical lines in the given order. An evaluation also keeps one fingerprint per row, the first
`ROW_DIGEST_CHARS` hex characters of the SHA-256 of its line, to say which row differs.

Values that JSON has no form for (the pixel arrays and images of vision rows, audio arrays) enter as JSON too:
a tensor or array as its nested list, an image as ``{"image": [mode, width, height], "sha256": <its pixel bytes>}``,
bytes as ``{"sha256": ...}``; text and number rows are unaffected.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

ROW_DIGEST_CHARS = 16
"""Hex characters kept of each row's SHA-256 (64 bits): enough to locate a differing row, short in the JSON. The
equality of two row sets is decided by the full SHA-256 of all rows."""


def canonical_line(row: Any, index: int, what: str = "forget set") -> bytes:
    """The canonical form of one row (see the module doc); raises TypeError naming the row when it is not a mapping."""
    if not isinstance(row, Mapping):
        raise TypeError(f"Row {index} of the {what} is a {type(row).__name__}, not a mapping of columns.")
    line = json.dumps(
        dict(row), sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_as_json
    )
    return line.encode("utf-8") + b"\n"


def _as_json(value: Any) -> Any:
    """The JSON stand-in of a value `json.dumps` cannot write (see the module doc); a TypeError for any other."""
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        return {"image": [value.mode, *value.size], "sha256": hashlib.sha256(value.tobytes()).hexdigest()}
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    raise TypeError(f"A value of type {type(value).__name__} in a row has no canonical form to fingerprint.")


def forget_fingerprint(rows: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 (hex) of the canonical form of `rows` (a `datasets.Dataset` or a list of dicts).

    Canonical form: each row as ``json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))``,
    followed by a newline, rows in the given order, encoded as UTF-8. Key order inside a row does not matter; row
    order does (the fingerprint names the exact sequence of rows a run trained on). Every column counts: fingerprint
    the rows exactly as they were given to the trainer.
    """
    digest = hashlib.sha256()
    count = 0
    for index, row in enumerate(rows):
        digest.update(canonical_line(row, index))
        count += 1
    if count == 0:
        raise ValueError("The forget set is empty: there is nothing to fingerprint.")
    return digest.hexdigest()


def describe_rows(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], what: str = "row set") -> dict[str, Any]:
    """What an evaluation records of one scored set: ``{"count", "columns", "sha256", "row_sha256"}``.

    Only `columns` (the ones the metric reads) are fingerprinted, so a copy of the data with an extra column (an
    ``id``, an ``author``) describes the same rows. ``sha256`` is the set fingerprint, ``row_sha256`` one short
    fingerprint per row (`ROW_DIGEST_CHARS`). An empty set is described too (count 0)."""
    columns = sorted(columns)
    whole = hashlib.sha256()
    per_row = []
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"Row {index} of the {what} is a {type(row).__name__}, not a mapping of columns.")
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"Row {index} of the {what} lacks the columns {missing}.")
        line = canonical_line({c: row[c] for c in columns}, index, what)
        whole.update(line)
        per_row.append(hashlib.sha256(line).hexdigest()[:ROW_DIGEST_CHARS])
    return {"count": len(per_row), "columns": columns, "sha256": whole.hexdigest(), "row_sha256": per_row}


def row_difference(reference: Mapping[str, Any], mine: Mapping[str, Any]) -> str | None:
    """How the rows `mine` describes differ from `reference`'s (both from `describe_rows`), or None when they are the
    same rows. The same rows in another order are the same rows: every metric compared against a reference (a KS
    test, an AUC, a mean) is blind to the order."""
    if reference.get("sha256") == mine.get("sha256") and reference.get("count") == mine.get("count"):
        return None
    theirs, ours = list(reference.get("row_sha256") or []), list(mine.get("row_sha256") or [])
    n_ref, n_mine = int(reference.get("count", len(theirs))), int(mine.get("count", len(ours)))
    if reference.get("columns") not in (None, mine.get("columns")):
        return f"the reference fingerprinted the columns {reference['columns']}, this evaluation {mine.get('columns')}"
    if n_ref == n_mine and theirs and sorted(theirs) == sorted(ours):
        return None
    first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b), None)
    if n_ref != n_mine:
        text = f"the reference has {n_ref} rows, this evaluation {n_mine}"
        if first is not None:
            return f"{text}; the first differing row is row {first}"
        common = min(n_ref, n_mine)
        if common and len(theirs) == n_ref and len(ours) == n_mine:
            longer = "this evaluation" if n_mine > n_ref else "the reference"
            return f"{text}: rows 0-{common - 1} agree, {longer} has {abs(n_mine - n_ref)} more from row {common}"
        return text
    if first is None:
        return "the set fingerprints differ (the per-row fingerprints were not recorded)"
    differing = sum(a != b for a, b in zip(theirs, ours, strict=True))
    return f"both have {n_mine} rows but {differing} differ; the first differing row is row {first}"
