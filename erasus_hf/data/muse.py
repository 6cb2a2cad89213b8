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
=========  ========================================  ==========================

Offline, ``data_dir`` is a folder with the same structure, one file per split: ``{data_dir}/{config}/{split}.json``
(e.g. ``news/verbmem/forget.json``, ``news/knowmem/forget_qa_icl.json``, ``news/privleak/holdout.json``), each
either JSON-lines (one object per line) or one JSON array of objects (the layout of MUSE's GitHub ``data/`` folder);
both are read by ``datasets``' JSON builder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from datasets import Dataset, load_dataset

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

ICL_PARTS = ("knowmem_forget_qa_icl", "knowmem_retain_qa_icl")
"""Few-shot examples: may be empty (zero-shot) and are not cut by ``select``."""


def load_muse_split(
    config: str, split: str, data_dir: str | Path | None = None, hub_id: str = MUSE_HUB_IDS["news"]
) -> Dataset:
    """One MUSE split: ``{data_dir}/{config}/{split}.json`` when `data_dir` is given, else the Hub config."""
    if data_dir is not None:
        path = Path(data_dir) / config / f"{split}.json"
        if not path.is_file():
            found = sorted(str(p.relative_to(data_dir)) for p in Path(data_dir).glob("*/*.json"))
            raise FileNotFoundError(f"MUSE split {config}/{split} not found: no {path}. Files in {data_dir}: {found}")
        return load_dataset("json", data_files=str(path), split="train")
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

    def __post_init__(self) -> None:
        for attribute, (config, split, columns) in MUSE_PARTS.items():
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
        """Load every part of `corpus` (``"news"`` or ``"books"``) from `data_dir` (offline, the layout of the
        module doc) or from the Hub (`hub_id`, by default ``MUSE_HUB_IDS[corpus]``)."""
        if hub_id is None:
            if corpus not in MUSE_HUB_IDS:
                raise ValueError(f"Unknown MUSE corpus {corpus!r}; known: {sorted(MUSE_HUB_IDS)} (or pass hub_id).")
            hub_id = MUSE_HUB_IDS[corpus]
        parts = {
            attribute: load_muse_split(config, split, data_dir=data_dir, hub_id=hub_id)
            for attribute, (config, split, _) in MUSE_PARTS.items()
        }
        return cls(**parts, corpus=corpus)

    def select(self, n: int) -> MUSEDataset:
        """The first `n` rows of every evaluated split (the few-shot examples are kept whole), for quick runs."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        cut = {
            f.name: getattr(self, f.name).select(range(min(n, len(getattr(self, f.name)))))
            for f in fields(self)
            if f.name in MUSE_PARTS and f.name not in ICL_PARTS
        }
        return replace(self, **cut)
