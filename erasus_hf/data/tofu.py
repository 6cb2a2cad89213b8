"""Loading TOFU (Maini et al. 2024, locuslab/TOFU, MIT licence).

Three sources, one schema: the Hugging Face Hub (what users run online), a local directory of JSON-lines files
named like the Hub configs (``forget01.json``, ``retain_perturbed.json``, ...; works offline), and a small slice
shipped inside the package (``demo_forget`` / ``demo_retain``) so the demo and the core tests run from a bare clone.
See ``tofu_demo/README.md`` for what the slice holds and its attribution.
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset

DEMO_DIR = Path(__file__).resolve().parent / "tofu_demo"
"""Where the shipped slice lives: ``forget.jsonl`` (authors 198-199) and ``retain.jsonl`` (authors 0-19)."""

DEMO_SPLITS = {"demo_forget": "forget.jsonl", "demo_retain": "retain.jsonl"}

QA_PER_AUTHOR = 20
"""Every TOFU author has 20 question/answer pairs; ``author = row_index_in_full // 20``."""


def _load_json_lines(path: Path) -> Dataset:
    return load_dataset("json", data_files=str(path), split="train")


def load_tofu(split: str, data_dir: str | Path | None = None, hub_id: str = "locuslab/TOFU") -> Dataset:
    """Load one TOFU config (``"full"``, ``"forget01"``, ``"retain_perturbed"``, ...) as a ``Dataset``.

    ``"demo_forget"`` and ``"demo_retain"`` always read the slice shipped in the package (they are not Hub configs).
    Otherwise ``data_dir`` (a folder of ``{split}.json`` JSON-lines files) is read when given, and the Hub when not.
    """
    if split in DEMO_SPLITS:
        return _load_json_lines(DEMO_DIR / DEMO_SPLITS[split])
    if data_dir is not None:
        path = Path(data_dir) / f"{split}.json"
        if not path.is_file():
            available = sorted(p.stem for p in Path(data_dir).glob("*.json"))
            raise FileNotFoundError(f"TOFU split {split!r} not found: no {path}. Splits in {data_dir}: {available}")
        return _load_json_lines(path)
    try:
        return load_dataset(hub_id, split, split="train")
    except OSError as err:  # ConnectionError when offline, FileNotFoundError for an unknown repo
        raise OSError(
            f"Could not load TOFU config {split!r} from the Hub dataset {hub_id!r}. Offline, pass "
            f"data_dir=<folder holding {split}.json> (JSON-lines files named like the Hub configs), or use the "
            "shipped slice: split='demo_forget' / 'demo_retain'."
        ) from err


def demo_splits(num_retain_authors: int = 6) -> tuple[Dataset, Dataset]:
    """``(forget, retain)`` from the shipped slice: forget = authors 198-199 (40 rows, the ``forget01`` split),
    retain = the first ``num_retain_authors`` of the 20 shipped retain authors (20 rows each)."""
    forget = load_tofu("demo_forget")
    retain = load_tofu("demo_retain")
    authors = sorted(set(retain["author"]))
    if not 1 <= num_retain_authors <= len(authors):
        raise ValueError(f"num_retain_authors must be in [1, {len(authors)}], got {num_retain_authors}")
    keep = set(authors[:num_retain_authors])
    retain = retain.filter(lambda author: author in keep, input_columns="author")
    return forget, retain


def shared_tofu_dir() -> Path | None:
    """The full TOFU data next to the repository (``<repo>/../shared/data/tofu``), or None when absent.

    Tests and benchmarks use it to go beyond the shipped slice, and skip with a reason when it is missing.
    """
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tofu"
    return path if path.is_dir() else None
