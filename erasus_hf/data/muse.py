"""Loading MUSE (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models",
arXiv:2407.06460; Hub datasets ``muse-bench/MUSE-News`` and ``muse-bench/MUSE-Books``).

The parts the evaluator reads, by Hub config and split:

=========  ========================================  ==========================
config     split                                     columns
=========  ========================================  ==========================
verbmem    ``forget``                                ``prompt``, ``gt``
knowmem    ``forget_qa``, ``retain_qa``              ``question``, ``answer``
knowmem    ``forget_qa_icl``, ``retain_qa_icl``      ``question``, ``answer``
privleak   ``forget``, ``holdout``                   ``text``
privleak   ``retain`` (optional)                     ``text``
raw        ``forget`` (optional)                     ``text``
=========  ========================================  ==========================

``privleak/retain`` is what MUSE's privacy evaluation scores beside forget and holdout; PrivLeak itself compares
forget with holdout only, so the split is loaded when present (``MUSEDataset.privleak_retain``, else None).
``raw/forget`` is the forget corpus itself (the articles or book chapters MUSE unlearns on, whole); the evaluator
reports its perplexity (``muse/forget_ppl``) when it is present (``MUSEDataset.raw_forget``, else None).

Offline, ``data_dir`` is one corpus folder holding one file per split, ``{data_dir}/{config}/{split}.json`` (e.g.
``news/verbmem/forget.json``, ``news/knowmem/forget_qa_icl.json``, ``news/privleak/holdout.json``). Two namings are
accepted:

- the Hub's split names (above), as ``load_data.py`` of MUSE's GitHub repository (``swj0419/muse_bench``) writes them;
- the names of the ``data/`` folder first published in that repository: ``knowmem/retain2_qa.json``,
  ``knowmem/retain2_qa_icl.json`` and ``privleak/retain2.json`` (MUSE's retain set is its ``raw/retain2`` split;
  that folder named the corpora ``bbc`` and ``hp``: pass the corpus folder itself).

Both files of one split present at once is an error naming both. A file is JSON-lines (one object per line, the Hub
export) or one JSON array (MUSE's GitHub files); both are read by ``datasets``' JSON builder, which makes an array of
plain strings (how MUSE writes ``privleak/*.json``) a ``text`` column.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from datasets import Dataset, load_dataset

from .tofu import _load_json_lines

MUSE_HUB_IDS = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}

MUSE_PARTS = {
    "verbmem_forget": ("verbmem", "forget", ("prompt", "gt")),
    "knowmem_forget_qa": ("knowmem", "forget_qa", ("question", "answer")),
    "knowmem_retain_qa": ("knowmem", "retain_qa", ("question", "answer")),
    "knowmem_forget_qa_icl": ("knowmem", "forget_qa_icl", ("question", "answer")),
    "knowmem_retain_qa_icl": ("knowmem", "retain_qa_icl", ("question", "answer")),
    "privleak_forget": ("privleak", "forget", ("text",)),
    "privleak_holdout": ("privleak", "holdout", ("text",)),
}
"""Attribute -> (config, split, required columns)."""

OPTIONAL_PARTS = {
    "privleak_retain": ("privleak", "retain", ("text",)),
    "raw_forget": ("raw", "forget", ("text",)),
}
"""Parts loaded when present (None otherwise)."""

ICL_PARTS = ("knowmem_forget_qa_icl", "knowmem_retain_qa_icl")
"""Few-shot examples: may be empty (zero-shot) and are not cut by ``select``."""

GITHUB_SPLIT_NAMES = {
    ("knowmem", "retain_qa"): "retain2_qa",
    ("knowmem", "retain_qa_icl"): "retain2_qa_icl",
    ("privleak", "retain"): "retain2",
}
"""(config, Hub split) -> the file name of the split in MUSE's original GitHub ``data/`` folder."""


def shared_muse_dir(corpus: str = "news") -> Path | None:
    """The MUSE slice next to the repository (``<repo>/../shared/data/muse/{corpus}``, the rule of
    ``erasus_hf.data.tofu.shared_tofu_dir``), or None when absent. Tests use it and skip when it is missing."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "muse" / corpus
    return path if path.is_dir() else None


def muse_split_path(data_dir: str | Path, config: str, split: str) -> Path | None:
    """The file of `config`/`split` under `data_dir` by its Hub or its GitHub name; None when neither exists.

    Raises ValueError when both exist (they may differ; which one is meant is the user's call)."""
    names = [split] + ([GITHUB_SPLIT_NAMES[config, split]] if (config, split) in GITHUB_SPLIT_NAMES else [])
    present = [p for p in (Path(data_dir) / config / f"{name}.json" for name in names) if p.is_file()]
    if len(present) > 1:
        raise ValueError(
            f"MUSE {config}/{split} is in two files, {present[0]} (the Hub's name) and {present[1]} (the name in "
            "MUSE's GitHub data/ folder); keep one of them."
        )
    return present[0] if present else None


def load_muse_split(
    config: str, split: str, data_dir: str | Path | None = None, hub_id: str = MUSE_HUB_IDS["news"]
) -> Dataset:
    """One MUSE split: from `data_dir` (see the module doc for the file names) when given, else the Hub config."""
    if data_dir is not None:
        path = muse_split_path(data_dir, config, split)
        if path is None:
            found = sorted(str(p.relative_to(data_dir)) for p in Path(data_dir).glob("*/*.json"))
            alias = GITHUB_SPLIT_NAMES.get((config, split))
            names = f"{config}/{split}.json" + (f" or {config}/{alias}.json" if alias else "")
            raise FileNotFoundError(f"MUSE split {config}/{split} not found: no {names} in {data_dir}. Files: {found}")
        return _load_json_lines(path)  # an empty file is refused, naming it
    try:
        return load_dataset(hub_id, config, split=split)
    except OSError as err:  # ConnectionError when offline, FileNotFoundError for an unknown repo
        raise OSError(
            f"Could not load MUSE {config}/{split} from the Hub dataset {hub_id!r}. Offline, pass data_dir=<folder "
            f"holding {config}/{split}.json> (see erasus_hf.data.muse for the layout)."
        ) from err


@dataclass
class MUSEDataset:
    """The MUSE splits the evaluator reads (see the module doc); columns are checked on construction."""

    verbmem_forget: Dataset
    knowmem_forget_qa: Dataset
    knowmem_retain_qa: Dataset
    knowmem_forget_qa_icl: Dataset
    knowmem_retain_qa_icl: Dataset
    privleak_forget: Dataset
    privleak_holdout: Dataset
    corpus: str = "news"
    privleak_retain: Dataset | None = None
    raw_forget: Dataset | None = None

    def __post_init__(self) -> None:
        parts = MUSE_PARTS | {a: p for a, p in OPTIONAL_PARTS.items() if getattr(self, a) is not None}
        for attribute, (config, split, columns) in parts.items():
            dataset = getattr(self, attribute)
            if not isinstance(dataset, Dataset):
                raise TypeError(f"MUSE {config}/{split} must be a datasets.Dataset, got {type(dataset).__name__}")
            if len(dataset) == 0:
                if attribute in ICL_PARTS:
                    continue  # zero-shot
                raise ValueError(f"MUSE {config}/{split} is empty.")
            missing = [c for c in columns if c not in dataset.column_names]
            if missing:
                raise ValueError(
                    f"MUSE {config}/{split} lacks the columns {missing}; it has {dataset.column_names} "
                    f"(needs {list(columns)})."
                )

    @classmethod
    def load(cls, corpus: str = "news", data_dir: str | Path | None = None, hub_id: str | None = None) -> MUSEDataset:
        """Load every part of `corpus` (``"news"`` or ``"books"``) from `data_dir` (offline, the corpus folder in
        either layout of the module doc) or from the Hub (`hub_id`, by default ``MUSE_HUB_IDS[corpus]``)."""
        if hub_id is None:
            if corpus not in MUSE_HUB_IDS:
                raise ValueError(f"Unknown MUSE corpus {corpus!r}; known: {sorted(MUSE_HUB_IDS)} (or pass hub_id).")
            hub_id = MUSE_HUB_IDS[corpus]
        parts = {
            attribute: load_muse_split(config, split, data_dir=data_dir, hub_id=hub_id)
            for attribute, (config, split, _) in MUSE_PARTS.items()
        }
        for attribute, (config, split, _) in OPTIONAL_PARTS.items():
            if data_dir is None or muse_split_path(data_dir, config, split) is not None:
                parts[attribute] = load_muse_split(config, split, data_dir=data_dir, hub_id=hub_id)
        return cls(**parts, corpus=corpus)

    def select(self, n: int) -> MUSEDataset:
        """The first `n` rows of every evaluated split (the few-shot examples are kept whole), for quick runs."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        cut = {
            f.name: getattr(self, f.name).select(range(min(n, len(getattr(self, f.name)))))
            for f in fields(self)
            if f.name in MUSE_PARTS | OPTIONAL_PARTS and f.name not in ICL_PARTS and getattr(self, f.name) is not None
        }
        return replace(self, **cut)
