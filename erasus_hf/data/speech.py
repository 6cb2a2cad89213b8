"""Transcribed audio datasets (one clip and its transcript per row) for the speech examples: loading, the forget/retain
split by transcript words, and the waveforms at a feature extractor's sampling rate."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Audio, Dataset, load_dataset, load_from_disk


def load_rows(dataset: str, config: str | None = None, split: str = "train") -> Dataset:
    """A folder written by `save_to_disk` (a `Dataset`, or a `DatasetDict` read at `split`), or a Hub dataset."""
    if os.path.isdir(dataset):
        loaded = load_from_disk(dataset)
        return loaded[split] if not isinstance(loaded, Dataset) else loaded
    return load_dataset(dataset, config, split=split)


def split_by_words(dataset: Dataset, words: Sequence[str], text_column: str = "text") -> tuple[Dataset, Dataset]:
    """(forget, retain): the rows whose transcript contains one of `words` as a whole word (case-insensitive), and
    the others."""
    if not words:
        raise ValueError("Give at least one word to forget.")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w.lower()) for w in words) + r")\b")
    hits = [bool(pattern.search(text.lower())) for text in dataset[text_column]]
    forget = dataset.select([i for i, hit in enumerate(hits) if hit])
    retain = dataset.select([i for i, hit in enumerate(hits) if not hit])
    if len(forget) == 0:
        raise ValueError(f"No transcript in column {text_column!r} contains any of {list(words)}.")
    return forget, retain


def at_sampling_rate(dataset: Dataset, audio_column: str, sampling_rate: int) -> Dataset:
    """`dataset` with a `datasets.Audio` column decoded at `sampling_rate` (resampled by `datasets`, which needs its
    audio extra); a column of raw arrays is returned as is and must already be at that rate."""
    if audio_column not in dataset.column_names:
        raise ValueError(f"No audio column {audio_column!r}; the dataset has {dataset.column_names}.")
    if isinstance(dataset.features[audio_column], Audio):
        return dataset.cast_column(audio_column, Audio(sampling_rate=sampling_rate))
    return dataset


def waveform(audio: Any) -> np.ndarray:
    """The float32 samples of one row's audio: a decoded `Audio` value (a dict or decoder with an `array`) or a raw
    array/list."""
    return np.asarray(audio if isinstance(audio, (list, np.ndarray)) else audio["array"], dtype=np.float32)
