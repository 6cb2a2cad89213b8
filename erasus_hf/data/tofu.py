"""Loading TOFU (Maini et al. 2024, locuslab/TOFU, MIT licence).

Three sources, one schema: the Hugging Face Hub (what users run online), a local directory of JSON-lines files
named like the Hub configs (``forget01.json``, ``retain_perturbed.json``, ...; works offline), and a small slice
shipped inside the package (``demo_forget`` / ``demo_retain``) so the demo and the core tests run from a bare clone.
See ``tofu_demo/README.md`` for what the slice holds and its attribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset

DEMO_DIR = Path(__file__).resolve().parent / "tofu_demo"
"""Where the shipped slice lives: ``forget.jsonl`` (authors 198-199) and ``retain.jsonl`` (authors 0-19)."""

DEMO_SPLITS = {"demo_forget": "forget.jsonl", "demo_retain": "retain.jsonl"}

QA_PER_AUTHOR = 20
"""Every TOFU author has 20 question/answer pairs; ``author = row_index_in_full // 20``."""


def _load_json_lines(path: Path) -> Dataset:
    with open(path, "rb") as file:  # an empty file makes the json builder raise a bare StopIteration
        while chunk := file.read(1 << 16):
            if chunk.strip():
                break
        else:
            raise ValueError(f"{path} is empty: it holds no rows (one JSON row per line, or a JSON array of rows).")
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


TOFU_EVAL_SPLITS = ("forget", "retain", "real_authors", "world_facts")
"""The four evaluation sets of TOFU, in the order the evaluator visits them."""

_PARAPHRASED_COLUMNS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
_FACT_COLUMNS = ("question", "answer", "perturbed_answer")
TOFU_EVAL_COLUMNS = {
    "forget": _PARAPHRASED_COLUMNS,
    "retain": _PARAPHRASED_COLUMNS,
    "real_authors": _FACT_COLUMNS,
    "world_facts": _FACT_COLUMNS,
}
"""Columns each evaluation set needs; real_authors and world_facts have no paraphrased answer."""


@dataclass
class TOFUDataset:
    """TOFU's evaluation sets (Maini et al. 2024, arXiv:2401.06121), any of them ``None`` when not evaluated.

    ``forget``: ``{forget_split}_perturbed``; ``retain``: ``retain_perturbed`` (400 rows of the retain authors);
    ``real_authors``: ``real_authors_perturbed`` (100 questions on real authors); ``world_facts``:
    ``world_facts_perturbed`` (117 world facts). Columns are checked on construction (see ``TOFU_EVAL_COLUMNS``);
    ``perturbed_answer`` is a list with the same number of answers on every row of a set.
    """

    forget: Dataset | None = None
    retain: Dataset | None = None
    real_authors: Dataset | None = None
    world_facts: Dataset | None = None
    forget_split: str = "forget10"

    def __post_init__(self) -> None:
        if not self.splits():
            raise ValueError(f"A TOFUDataset needs at least one of {TOFU_EVAL_SPLITS}.")
        for name, dataset in self.splits().items():
            missing = [c for c in TOFU_EVAL_COLUMNS[name] if c not in dataset.column_names]
            if missing:
                raise ValueError(
                    f"TOFU {name!r} set lacks the columns {missing}; it has {dataset.column_names} "
                    f"(needs {list(TOFU_EVAL_COLUMNS[name])})."
                )
            if len(dataset) == 0:
                raise ValueError(f"TOFU {name!r} set is empty.")
            counts = {len(p) for p in dataset["perturbed_answer"]}
            if 0 in counts or len(counts) != 1:
                raise ValueError(
                    f"TOFU {name!r} set: every row needs the same, non-zero number of perturbed answers; "
                    f"found counts {sorted(counts)}."
                )

    @classmethod
    def load(
        cls,
        forget_split: str = "forget10",
        data_dir: str | Path | None = None,
        hub_id: str = "locuslab/TOFU",
        splits: tuple[str, ...] = TOFU_EVAL_SPLITS,
    ) -> TOFUDataset:
        """Load the evaluation sets named in `splits` with :func:`load_tofu` (the Hub when `data_dir` is None, else
        the ``*_perturbed.json`` files of `data_dir`). `forget_split` is ``"forget01"``, ``"forget05"`` or
        ``"forget10"``."""
        unknown = [s for s in splits if s not in TOFU_EVAL_SPLITS]
        if unknown or not splits:
            raise ValueError(f"splits must be a non-empty subset of {TOFU_EVAL_SPLITS}, got {tuple(splits)}.")
        configs = {
            "forget": f"{forget_split}_perturbed",
            "retain": "retain_perturbed",
            "real_authors": "real_authors_perturbed",
            "world_facts": "world_facts_perturbed",
        }
        loaded = {s: load_tofu(configs[s], data_dir=data_dir, hub_id=hub_id) for s in splits}
        return cls(**loaded, forget_split=forget_split)

    def splits(self) -> dict[str, Dataset]:
        """The sets present, by name, in ``TOFU_EVAL_SPLITS`` order."""
        return {s: getattr(self, s) for s in TOFU_EVAL_SPLITS if getattr(self, s) is not None}

    def select(self, n: int) -> TOFUDataset:
        """The first `n` rows of every set (all rows of a smaller set), for quick runs."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        subsets = {s: d.select(range(min(n, len(d)))) for s, d in self.splits().items()}
        return TOFUDataset(**subsets, forget_split=self.forget_split)
