"""One run per output folder, written completely or not at all.

`StagedSave` is how `UnlearningTrainer._save` writes: every file of a save goes into a staging folder first (on the
same filesystem, so a rename moves it), is checked there (`non_finite_tensors`), and only then moves into place.
This is what transformers' PR #27820 did for checkpoints (a staging folder beside the target, renamed when complete;
not under /tmp, which may be another filesystem). An interrupted, failed or refused save removes its staging folder
and leaves the target exactly as it was: the previous run stays loadable until the new one is complete.

- A target that does not exist yet (a `checkpoint-N` folder, a fresh `output_dir`) is staged beside it as
  `.<name>.erasus-save-<hex>` and appears with one `os.rename`: complete or absent.
- A target that exists keeps everything the save does not write (`checkpoint-*/`, `runs/`, `starting_model/`,
  `eval.json`, the model card): the save is staged inside it as `.erasus-save-<hex>/` and its files move in by
  `os.replace`, one each. SIGINT is held back for those few renames (main thread), and the files that make a folder
  load (`config.json`, `adapter_config.json`, the diffusion weight files) go first out and last in, so even a hard kill
  in that window leaves a folder that refuses to load, never one that loads a mix.

`weight_files` / `run_files` tell another run's files apart (see `UnlearningConfig.overwrite_output_dir`), and
`save_plan` decides from them what a save replaces; `write_run_record` writes what a run's folder holds beside its
weights.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .redaction import redact, redact_json

STAGING_MARK = ".erasus-save-"
# Weights of any kind, at the top level of a folder: safetensors (full, sharded, adapter, diffusion LoRA or trained
# UNet tensors) and the pickled formats of older saves.
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
    "pytorch_lora_weights.bin",
    "tf_model.h5",
    "flax_model.msgpack",
)
# What else belongs to a saved run and goes with it when another run replaces it: configs, tokenizer files, the
# model card and evaluation (the files `erasus_hf.hub.push.files_to_push` would ship). Subfolders always stay.
RUN_PATTERNS = (
    *WEIGHT_PATTERNS,
    "*.json",
    "README.md",
    "*.jinja",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
# A folder loads through these (transformers: config.json, PEFT: adapter_config.json, `load_erasure`: its weight
# files); during a commit they leave first and arrive last, in this order.
GATES = ("pytorch_lora_weights.safetensors", "unet_erased.safetensors", "config.json", "adapter_config.json")


def _top_level_files(folder: str, patterns: Iterable[str]) -> list[str]:
    if not os.path.isdir(folder):
        return []
    patterns = tuple(patterns)
    return sorted(
        n
        for n in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, n)) and any(fnmatch.fnmatchcase(n, p) for p in patterns)
    )


def weight_files(folder: str) -> list[str]:
    """The weight files at the top level of `folder` (none when it does not exist)."""
    return _top_level_files(folder, WEIGHT_PATTERNS)


def run_files(folder: str) -> list[str]:
    """The top-level files of a saved run in `folder`: weights, JSON configs, tokenizer files, card, evaluation."""
    return _top_level_files(folder, RUN_PATTERNS)


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse an `output_dir` that already holds another run's weights, unless `overwrite` (then that run's files
    are replaced when this run's model is saved, see `StagedSave`)."""
    found = weight_files(output_dir)
    if found and not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir!r} already holds another run's weights {found}; saving this run there would mix "
            "the two (from_pretrained, evaluate and push would read both). Choose a new output_dir, or set "
            "overwrite_output_dir=True (--overwrite_output_dir) to replace that run: its weights, configs, tokenizer "
            "files, model card and eval.json are removed once this run's model is saved (subfolders such as "
            "checkpoint-*/ stay)."
        )


def save_plan(
    target: str, output_dir: str, previous: Iterable[str] | None, overwrite: bool
) -> tuple[list[str], list[str]]:
    """(names to delete from `target` unless the save rewrites them, names to carry into the staging folder) for a
    save into `target` by the run whose `output_dir` it is: `previous`, the names this run's earlier save there
    wrote, are replaced (its README.md, maybe our card by now, carried for PEFT to update); another run's files are
    replaced only inside `output_dir` (`checkpoint-N`, the Trainer's own) or with `overwrite`, else refused."""
    if previous is not None:
        return sorted(previous), ["README.md"]
    out = os.path.abspath(output_dir)
    inside = target != out and os.path.commonpath([target, out]) == out
    if not weight_files(target):
        return [], ["README.md"]
    if not inside:
        check_output_dir(target, overwrite)
    return run_files(target), []


TEXT_FORMAT_RECORD = "text_format.json"


def write_run_record(
    folder: str,
    processing_class: Any | None,
    config_json: str,
    strategy: Mapping[str, Any],
    text_format: Mapping[str, Any] | None = None,
    coreset: Mapping[str, Any] | None = None,
) -> None:
    """What a run's folder holds beside its weights: the tokenizer (or processor) when there is one, the run's
    arguments as `unlearning_config.json`, the strategy (name, paper, hyperparameters) as `strategy.json` and, for
    a run on text rows, how they were rendered as `text_format.json` (`text_format`: `TextFormat.describe` with the
    row formats under ``rows``; written as ``{"row_formats": ..., "text_format": ...}``) and, for a run on a
    coreset, which examples it kept as `coreset.json` (`CoresetReport.to_dict`), each with every known secret
    redacted."""
    if processing_class is not None:
        processing_class.save_pretrained(folder)
    with open(os.path.join(folder, "unlearning_config.json"), "w") as f:
        f.write(redact(config_json))
    with open(os.path.join(folder, "strategy.json"), "w") as f:
        json.dump(redact_json(dict(strategy)), f)
    if text_format is not None:
        record = {"row_formats": dict(text_format.get("rows") or {}), "text_format": dict(text_format)}
        with open(os.path.join(folder, TEXT_FORMAT_RECORD), "w") as f:
            json.dump(redact_json(record), f)
    if coreset is not None:
        with open(os.path.join(folder, "coreset.json"), "w") as f:
            json.dump(redact_json(dict(coreset)), f)


def non_finite_tensors(folder: str) -> list[str]:
    """`file:tensor` for every floating-point tensor with a NaN or an infinity in the safetensors files under
    `folder`: what a save actually wrote, after any merge."""
    bad = []
    for root, _, names in os.walk(folder):
        for name in sorted(n for n in names if n.endswith(".safetensors")):
            path = os.path.join(root, name)
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        bad.append(f"{os.path.relpath(path, folder)}:{key}")
    return bad


def check_finite_weights(model: nn.Module) -> None:
    """Refuse a model with a NaN or an infinity in any floating-point tensor of its state dict, frozen weights
    included (what a full or merged save would write); saves check the files they write (`StagedSave`)."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if bad:
        raise FloatingPointError(f"Refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}).")


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back until the block ends, then deliver it; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                raise KeyboardInterrupt


def _discard(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _move_in(source: str, target: str) -> None:
    """`os.replace`, which also replaces a folder (PEFT saves a non-default adapter into a subfolder)."""
    if os.path.isdir(source) and os.path.isdir(target):
        aside = f"{target}{STAGING_MARK}old-{uuid.uuid4().hex[:8]}"
        os.rename(target, aside)
        os.rename(source, target)
        shutil.rmtree(aside)
    else:
        os.replace(source, target)


class StagedSave:
    """`with StagedSave(target, remove=names) as staging:` write the save into `staging`; on a normal exit its
    files move into `target` and the `remove` names the save did not write are deleted from it (another run's, or
    this run's earlier save's); on any exception, KeyboardInterrupt included, and when a safetensors file written
    holds a NaN or an infinity (FloatingPointError), the staging folder is removed and `target` is left as it was.
    `carry` names files of `target` copied into the staging folder first, for writers
    that update a file rather than replace it (PEFT merges its metadata into an existing README.md).

    After the block, `written` holds the top-level names the save wrote."""

    def __init__(self, target: str, *, remove: Iterable[str] = (), carry: Iterable[str] = ()) -> None:
        self.target = os.path.abspath(target)
        self.remove = set(remove)
        self.carry = [n for n in carry if os.path.isfile(os.path.join(self.target, n))]
        self.written: list[str] = []
        self.staging = ""

    def __enter__(self) -> str:
        parent, name = os.path.split(self.target)
        os.makedirs(parent, exist_ok=True)
        self._fresh = not os.path.exists(self.target)
        where, prefix = (parent, f".{name}{STAGING_MARK}") if self._fresh else (self.target, STAGING_MARK)
        for left in os.listdir(where):  # staging folders of saves that were killed
            if left.startswith(prefix):
                shutil.rmtree(os.path.join(where, left), ignore_errors=True)
        self.staging = os.path.join(where, f"{prefix}{uuid.uuid4().hex[:12]}")
        os.mkdir(self.staging)
        for carried in self.carry:
            shutil.copy2(os.path.join(self.target, carried), os.path.join(self.staging, carried))
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _commit(self) -> None:
        bad = non_finite_tensors(self.staging)
        if bad:
            raise FloatingPointError(
                f"Refusing to save non-finite weights ({len(bad)} tensors, e.g. {bad[:3]}); {self.target} was left "
                "as it was. Lower the learning rate, or check the model before training (a NaN in a frozen "
                "weight reaches the file through merge_adapter)."
            )
        new = sorted(os.listdir(self.staging))
        self.written = new
        if self._fresh:
            try:
                os.rename(self.staging, self.target)  # the whole folder appears at once
                return
            except OSError:
                if not os.path.isdir(self.target):  # not "something appeared meanwhile": a real failure
                    raise
        stale = sorted(n for n in self.remove - set(new) if os.path.lexists(os.path.join(self.target, n)))
        leaving = [g for g in GATES if (g in new or g in stale) and os.path.lexists(os.path.join(self.target, g))]
        arriving = [g for g in GATES if g in new]
        with _sigint_held():
            for name in leaving:  # from here on the old run no longer loads
                _discard(os.path.join(self.target, name))
            for name in stale:
                _discard(os.path.join(self.target, name))
            for name in new:
                if name not in arriving:
                    _move_in(os.path.join(self.staging, name), os.path.join(self.target, name))
            for name in arriving:  # and from here on the new one does
                _move_in(os.path.join(self.staging, name), os.path.join(self.target, name))
