"""One side of an unlearning run (the forget or the retain rows) loaded from where a user keeps it, as TRL's scripts
load their training data (`dataset_name`, `dataset_config`, a split) with `datasets.load_dataset`.

Where the rows come from (`DataSource.name`):

- a file, by its extension: ``.json``/``.jsonl`` (JSON lines, or one JSON array), ``.parquet``, ``.csv``, read by
  that builder (``load_dataset("json", data_files=path)``); a file is one split, ``train``;
- a folder holding ``{config}/{split}.json`` (or ``.jsonl``; the layout of ``../shared/data/muse/news``, MUSE's Hub
  configs and splits) or ``{split}.json`` (a TOFU ``data_dir``): that file;
- any other folder: ``load_dataset(folder, config, split=split)``, datasets' own rules (split names from the file
  names, ``train.jsonl``/``test.jsonl``, or the configs of a README);
- anything else: a Hub dataset id, ``load_dataset(id, config, split=split)``.

A split may be sliced as `datasets` slices one: ``train[:100]``, ``forget[10%:]``.

Whatever goes wrong (a missing file, an extension no builder reads, an unknown config or split, a Hub dataset that
cannot be reached, an unreadable or empty file) raises `DataSourceError`, one line naming the option the value came
from and the fix, before any model is loaded.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, get_dataset_split_names, load_dataset
from datasets.exceptions import DatasetGenerationError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""A local file's extension -> the `datasets` builder that reads it."""

SPLIT = re.compile(r"(?P<base>[\w.\-]+)(?P<slice>\[.*\])?")
HUB_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


class DataSourceError(ValueError):
    """Rows that cannot be loaded as given; the message is one line naming the option and the fix."""


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class DataSource:
    """Where one side's rows are: `name` a file, a folder or a Hub dataset id; `config` the dataset configuration
    (`load_dataset`'s `name`); `split` which split (a file has one, ``train``). `flags` are the command-line options
    the name, config and split came from, for the messages (``--forget_dataset_name``, ...)."""

    name: str
    config: str | None = None
    split: str = "train"
    flags: tuple[str, str, str] = ("--dataset_name", "--dataset_config", "--dataset_split")

    @property
    def option(self) -> str:
        return self.flags[0]

    @property
    def config_option(self) -> str:
        return self.flags[1]

    @property
    def split_option(self) -> str:
        return self.flags[2]

    @property
    def hub_id(self) -> str | None:
        """The Hub dataset id the rows come from (what a model card's `datasets:` may list), None for local rows."""
        return None if is_local(self.name) else self.name

    def describe(self) -> str:
        """``name`` with its config and split, e.g. ``muse-bench/MUSE-News (raw, forget)``."""
        parts = [p for p in (self.config, self.split) if p]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def as_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "config": self.config, "split": self.split}

    def load(self) -> Dataset:
        """The rows (see the module doc); raises `DataSourceError`."""
        split = SPLIT.fullmatch(self.split or "")
        if split is None:
            raise DataSourceError(
                f"{self.split_option} {self.split!r} is not a split name: give one such as 'train', optionally "
                "sliced, 'train[:100]'."
            )
        if os.path.isfile(self.name):
            dataset = self._load_file(Path(self.name), split["base"], split["slice"] or "")
        elif os.path.isdir(self.name):
            dataset = self._load_folder(Path(self.name), split["base"], split["slice"] or "")
        elif is_local(self.name):
            where = os.path.abspath(os.path.expanduser(self.name))
            raise DataSourceError(
                f"{self.option} {self.name!r}: no such file or folder ({where} does not exist). Check the path; a "
                f"Hub dataset id is namespace/name. Files may be {', '.join(BUILDERS)}."
            )
        else:
            dataset = self._load_hub()
        if len(dataset) == 0:
            raise DataSourceError(f"{self.option} {self.describe()!r} has no rows.")
        return dataset

    # ---- the three kinds of source ----

    def _load_file(self, path: Path, split: str, cut: str) -> Dataset:
        """The file `self.name` (one split, `train`) or a folder's `{config}/{split}` file (`split` already found)."""
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataSourceError(
                f"{self.option} {str(path)!r}: a {path.suffix or 'extensionless'} file, which no loader here reads; "
                f"give a {', '.join(BUILDERS)} file (or a folder, or a Hub dataset id)."
            )
        if os.path.isfile(self.name):
            if self.config is not None:
                raise DataSourceError(
                    f"{self.config_option} {self.config!r}: {self.option} {self.name!r} is a file, which has no "
                    "configurations; drop the option (or point at a folder or a Hub dataset that has them)."
                )
            if split != "train":
                raise DataSourceError(
                    f"{self.split_option} {self.split!r}: {self.name!r} is one file, whose only split is 'train' "
                    "(sliced, e.g. 'train[:100]'); available: ['train']."
                )
        if not _has_content(path):
            raise DataSourceError(f"{self.option} {self.describe()!r}: {path} is empty; it holds no rows.")
        try:
            return load_dataset(builder, data_files=str(path), split=f"train{cut}")
        except Exception as err:  # the builders' parse errors (ArrowInvalid, DatasetGenerationError) name no option
            raise DataSourceError(
                f"{self.option} {str(path)!r} could not be read as {builder}: {_reason(err)}"
            ) from err

    def _load_folder(self, folder: Path, split: str, cut: str) -> Dataset:
        """A folder's `{config}/{split}` (or `{split}`) file when there is one, else datasets' folder loading (a
        README's configs, split names from file names)."""
        base = folder / self.config if self.config else folder
        for extension in BUILDERS:
            path = base / f"{split}{extension}"
            if path.is_file():
                return self._load_file(path, split, cut)
        try:
            return self._load_with_datasets()
        except DataSourceError as err:
            if not (self.config and base.is_dir() and not (folder / "README.md").is_file()):
                raise
            available = sorted(p.stem for p in base.iterdir() if p.suffix in BUILDERS)  # the {config}/{split} layout
            raise DataSourceError(
                f"{self.split_option} {split!r}: no {split}.json in {base} (the {self.config!r} config of "
                f"{str(folder)!r}); its splits: {available}."
            ) from err

    def _load_hub(self) -> Dataset:
        try:
            return self._load_with_datasets()
        except ConnectionError as err:  # offline mode, no network, a wrong HF_ENDPOINT
            raise DataSourceError(
                f"{self.option} {self.name!r}: cannot reach the Hub to load it ({_reason(err)}). Offline, give a "
                f"local copy: a {', '.join(BUILDERS)} file or a folder of them."
            ) from err
        except FileNotFoundError as err:  # DatasetNotFoundError: no such repository (or a gated/private one)
            raise DataSourceError(
                f"{self.option} {self.name!r}: no such Hub dataset, and no such local file or folder ({_reason(err)})."
            ) from err

    def _load_with_datasets(self) -> Dataset:
        try:
            dataset = load_dataset(self.name, self.config, split=self.split)
        except ValueError as err:
            message = str(err)
            if "BuilderConfig" in message or "Config name is missing" in message:
                raise DataSourceError(f"{self.config_option} {self.config!r}: {self.name!r} {_reason(err)}") from err
            if "Unknown split" in message or "Bad split" in message:
                raise DataSourceError(
                    f"{self.split_option} {self.split!r}: {self.name!r} has no such split; its splits: "
                    f"{self._split_names()}."
                ) from err
            raise
        except DatasetGenerationError as err:  # e.g. a folder whose files do not form one table
            raise DataSourceError(
                f"{self.option} {self.name!r} (config {self.config!r}, split {self.split!r}) could not be read: "
                f"{_reason(err)}. Name the config ({self.config_option}) or the file itself."
            ) from err
        if isinstance(dataset, DatasetDict):  # split=None never reaches here; kept for a loader returning one
            raise DataSourceError(f"{self.split_option}: pick one of {list(dataset)}.")
        return dataset

    def _split_names(self) -> list[str] | str:
        try:
            return get_dataset_split_names(self.name, self.config)
        except Exception as err:  # the names are a hint; the error above stands without them
            return f"unknown ({_reason(err)})"


def is_local(name: str) -> bool:
    """Whether `name`, which is not an existing file or folder, was meant as a local path rather than a Hub dataset
    id (`namespace/name`): absolute, `./` or `~`, a file extension of `BUILDERS`, more than one `/`, or characters no
    Hub id has."""
    return (
        os.path.exists(name)
        or os.path.isabs(name)
        or name.startswith((".", "~"))
        or Path(name).suffix.lower() in BUILDERS
        or not HUB_ID.fullmatch(name)
    )


def _has_content(path: Path) -> bool:
    with open(path, "rb") as file:  # an empty JSON file makes the json builder raise a bare StopIteration
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _reason(err: BaseException) -> str:
    """An exception as one line: its message, or its cause's when the message is generic (datasets' builders)."""
    cause = err.__cause__ or err.__context__
    text = one_line(err) or type(err).__name__
    if cause is not None and ("error occurred while generating" in text or not text):
        text = f"{text}: {one_line(cause)}"
    return text[:400]
