"""What an exact resume needs beyond the Trainer's own checkpoint files, in one file of each checkpoint folder.

`transformers.Trainer` checkpoints the weights, the optimizer, the scheduler, the RNG states and `TrainerState` (step,
epoch, the `ExportableState` callbacks). An unlearning run also keeps:

- the strategy's state between optimizer steps (`Strategy.state_dict()`: PDU's dual variable and the retain losses
  buffered for its next update, SalUn's saliency mask);
- the cached reference log-probs (`CachedReference`), computed once from the *starting* model: a resumed trainer
  recomputes them from the model it is given, which is right only if that is the run's starting model;
- what makes it the same run (strategy and hyperparameters, loss weights, retain loss, pairing and data seeds,
  reference mode, set sizes).

`UnlearningTrainer` writes them to `unlearning_state.safetensors` (tensors, plus JSON in the header's metadata) while
the Trainer saves its RNG states, so the file is in place before `trainer_state.json` completes the checkpoint, and
reads it in `train(resume_from_checkpoint=...)` before any compute. A checkpoint of another run, or one whose cached
log-probs do not match the given starting model, is refused with the differences. The retain pairing of an epoch
needs no storing: it is a function of the pairing seed and the epoch (`ForgetRetainDataset.set_epoch`).

The `trainer` these functions take is an `UnlearningTrainer` (its `strategy`, `reference`, `reference_mode` and
pairing `train_dataset` are read), annotated as the `transformers.Trainer` it is: this room sits below the trainer
and does not import it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .reference import CachedReference

logger = logging.getLogger(__name__)

RESUME_STATE_NAME = "unlearning_state.safetensors"
FORMAT = "erasus_hf.unlearning_state/1"
# cached log-probs recomputed on other hardware or with another eval batch size agree far closer than this; another
# starting model (e.g. the checkpoint itself passed as `model`) does not
LOGPROB_RTOL = LOGPROB_ATOL = 1e-3


def is_complete(checkpoint: str) -> bool:
    """Whether the Trainer finished writing `checkpoint`: `trainer_state.json` is its last file."""
    return os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME))


def checkpoint_to_resume(requested: str | os.PathLike | bool | None, output_dir: str) -> str | None:
    """The checkpoint folder `train(resume_from_checkpoint=requested)` resumes: None for None/False; for True the
    newest *complete* `checkpoint-*` of `output_dir` (one the run was killed while writing is skipped, with a
    warning); a given folder must exist and be complete. Raises ValueError naming the folder otherwise."""
    if requested is None or requested is False:
        return None
    if requested is True:
        steps = {}
        if os.path.isdir(output_dir):
            for name in os.listdir(output_dir):
                match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
                if match and os.path.isdir(os.path.join(output_dir, name)):
                    steps[int(match.group(1))] = os.path.join(output_dir, name)
        complete = [step for step in sorted(steps) if is_complete(steps[step])]
        if not complete:
            found = f" (only incomplete ones: {sorted(steps.values())})" if steps else ""
            raise ValueError(
                f"resume_from_checkpoint=True, but {output_dir} holds no complete checkpoint-* folder to resume"
                f"{found}."
            )
        skipped = [steps[step] for step in sorted(steps) if step > complete[-1]]
        if skipped:
            logger.warning(
                "Skipping %s: the run was stopped while writing it (no %s); resuming from %s.",
                ", ".join(skipped),
                TRAINER_STATE_NAME,
                steps[complete[-1]],
            )
        return steps[complete[-1]]
    folder = os.fspath(requested)
    if not os.path.isdir(folder):
        raise ValueError(f"resume_from_checkpoint={folder!r} is not a folder; pass a checkpoint-* folder, or True.")
    if not is_complete(folder):
        raise ValueError(
            f"Cannot resume from {folder}: it is incomplete (no {TRAINER_STATE_NAME}; the run was stopped while "
            "writing it). Resume from the checkpoint before it, or pass resume_from_checkpoint=True to pick the "
            "newest complete one."
        )
    return folder


def _json(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists), so a stored and a current value compare equal."""
    return json.loads(json.dumps(value, default=str))


def run_identity(trainer: Trainer) -> dict[str, Any]:
    """The settings that make a resumed run the same run: any difference means another run's checkpoint."""
    args, strategy = trainer.args, trainer.strategy
    retain = trainer.train_dataset.retain
    return _json(
        {
            "strategy": strategy.name,
            "hyperparameters": strategy.hyperparameters,
            "forget_weight": args.forget_weight,
            "retain_weight": args.retain_weight,
            "retain_loss": args.retain_loss,
            "retain_kl_positions": args.retain_kl_positions,
            "pairing_seed": args.pairing_seed,
            "seed": args.seed,
            "data_seed": args.data_seed,
            "reference_mode": trainer.reference_mode,
            "forget_examples": len(trainer.train_dataset),
            "retain_examples": len(retain) if retain is not None else None,
        }
    )


def save_resume_state(trainer: Trainer, folder: str) -> None:
    """Write `unlearning_state.safetensors` into checkpoint `folder` (main process only), atomically."""
    if not trainer.args.should_save:
        return
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for key, value in trainer.strategy.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"strategy.{key}"] = value.detach().cpu().contiguous()
        else:
            values[key] = value
    if isinstance(trainer.reference, CachedReference):
        tensors["reference.logprobs"] = trainer.reference.logprobs.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "run": json.dumps(run_identity(trainer)),
        "strategy": json.dumps(values, allow_nan=False),
    }
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RESUME_STATE_NAME)
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def read_resume_state(folder: str) -> tuple[dict[str, str], dict[str, torch.Tensor]] | None:
    """(metadata, tensors) of the checkpoint's `unlearning_state.safetensors`, or None when it has none."""
    path = os.path.join(folder, RESUME_STATE_NAME)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an erasus_hf unlearning state (format {metadata.get('format')!r}).")
    return metadata, tensors


def load_resume_state(trainer: Trainer, folder: str) -> None:
    """Give the trainer back the run state stored in checkpoint `folder`: the strategy's state and the cached
    reference log-probs. Raises ValueError, before any training, when the checkpoint is another run's."""
    cached = isinstance(trainer.reference, CachedReference)
    stored = read_resume_state(folder)
    if stored is None:
        if trainer.strategy.stateful or cached:
            what = "the strategy's state" if trainer.strategy.stateful else "the cached reference log-probs"
            raise ValueError(
                f"Cannot resume from {folder}: it holds no {RESUME_STATE_NAME}, so {what} of the "
                f"{trainer.strategy.name!r} run cannot be restored and the resumed run would not be that run (a "
                "checkpoint saved with save_only_model=True, or by another tool). Resume from a checkpoint saved "
                "without save_only_model, or start a new run without resume_from_checkpoint."
            )
        return
    metadata, tensors = stored
    then, now = json.loads(metadata["run"]), run_identity(trainer)
    differences = [f"{key}: {then.get(key)!r} then, {now.get(key)!r} now" for key in now if then.get(key) != now[key]]
    if differences:
        raise ValueError(
            f"Cannot resume from {folder}: it was written by another run ({'; '.join(differences)}). Resume with the "
            "settings and data of the run that wrote it, or start a new run in another output_dir."
        )
    if cached:
        check_cached_logprobs(trainer.reference, tensors["reference.logprobs"], folder)
    state: dict[str, Any] = json.loads(metadata["strategy"])
    state.update({key.removeprefix("strategy."): t for key, t in tensors.items() if key.startswith("strategy.")})
    trainer.strategy.load_state_dict(state)


def check_cached_logprobs(reference: CachedReference, stored: torch.Tensor, folder: str) -> None:
    """Use the run's own cached log-probs, after checking that the given model reproduces them."""
    current = reference.logprobs
    if current.shape != stored.shape:
        raise ValueError(
            f"Cannot resume from {folder}: its cached reference log-probs cover {stored.shape[0]} forget examples, "
            f"this trainer's {current.shape[0]}; resume with the forget (and eval) sets of the run that wrote it."
        )
    gap = (current.float().cpu() - stored.float()).abs().nan_to_num(0.0)
    differs = gap > LOGPROB_ATOL + LOGPROB_RTOL * stored.float().abs().nan_to_num(0.0)
    if differs.any() or not torch.equal(current.isnan().cpu(), stored.isnan()):
        worst = int(gap.max(-1).values.argmax())
        raise ValueError(
            f"Cannot resume from {folder}: the reference log-probs of the forget set, recomputed from the model given "
            f"to this trainer, differ from those the run cached from its starting model (by up to "
            f"{gap.max().item():.4g} nats, forget example {worst}), so this is not the model that run started from. "
            "Resume with the run's starting model (the model it began from, not a checkpoint of it)."
        )
    reference.logprobs = stored.to(dtype=current.dtype, device=current.device)
