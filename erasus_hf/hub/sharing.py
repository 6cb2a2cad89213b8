"""The trainer's Hub side: `Trainer`'s repo creation, pushes and model card, the erasus_hf way.

`HubMixin` comes before `transformers.Trainer` in `UnlearningTrainer`'s bases, so the Trainer's own calls
(`init_hf_repo` at construction with `args.push_to_hub`, `_push_from_checkpoint` at each save, `push_to_hub`,
`create_model_card`) land here, with the Trainer's names and signatures. What changes: the upload goes through
`erasus_hf.hub.push` (only a model's shippable files, never a checkpoint's optimizer, scheduler or RNG state, the
token scrubbed from every message), and the card is the evaluation card of `erasus_hf.hub.card`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import MappingProxyType
from typing import Any

from transformers import PreTrainedModel
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils.hub import PushInProgress

from ..data.fingerprint import forget_fingerprint
from ..evaluation.result import EvaluationResult
from ..peft_utils import is_peft_model
from .card import BASE_TAGS, build_model_card, training_arguments, write_model_card
from .push import create_model_repo, files_to_push, push_output

logger = logging.getLogger(__name__)

# `create_model_card`'s arguments when it was not called (or left them out)
CARD_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "model_name": None,
        "tags": [],
        "evaluation": None,
        "reference_note": None,
        "command": None,
        "datasets": None,
        "guarantees": [],
    }
)


class HubMixin:
    """`Trainer`'s Hub methods for `UnlearningTrainer`: read with the trainer's `args`, `strategy`, `forget_rows`,
    `retain_rows`, `reference_mode`, `last_evaluation`, `text_format`, `row_formats` and `coreset`; `_hub_pool` (the
    one upload thread, started on the first background push) and `push_in_progress` are set to None by the trainer's
    `__init__`."""

    _hub_pool: ThreadPoolExecutor | None
    push_in_progress: PushInProgress | None
    # what the last `create_model_card` call said (replaced by each call): every later card is written with it
    _card_arguments: Mapping[str, Any] = MappingProxyType({})

    def create_model_card(
        self,
        *,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | Sequence[str] | None = None,
        evaluation: EvaluationResult | None = None,
        reference_note: str | None = None,
        command: str | None = None,
        datasets: Sequence[str] | None = None,
        guarantees: Sequence[str] = (),
    ) -> None:
        """Write the evaluation model card (README.md) to `output_dir`: strategy, hyperparameters, the forget set
        as a count and a SHA-256 fingerprint (never its text), the evaluation (default: the last in-training one)
        and the reproducing command. Runs on the main process.

        TRL's arguments: `model_name` (the title), `dataset_name` (added to `datasets`, the card's `datasets`
        metadata), `tags` (after erasus-hf's and the strategy's). The arguments are kept: every later save
        (`save_model`, each checkpoint, see `write_card`) writes the card again with them. `guarantees`: markdown
        blocks for the card's "Guarantees and verification" section (`build_model_card`)."""
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        names = [*(datasets or []), *([dataset_name] if dataset_name else [])]
        self._card_arguments = {
            "model_name": model_name,
            "tags": extra_tags,
            "evaluation": evaluation,
            "reference_note": reference_note,
            "command": command,
            "datasets": list(dict.fromkeys(names)) or None,
            "guarantees": list(guarantees),
        }
        if self.args.should_save:
            self._write_card(self.args.output_dir, any_model=True)

    def write_card(self, folder: str) -> None:
        """Write this run's card into `folder`, a save's staging folder (`UnlearningTrainer._save`, after the
        weights: PEFT's README.md is there to merge), so the card is part of the save, complete or absent, in
        `output_dir` and in every `checkpoint-*` (TRL writes its card at each checkpoint and in `save_model`
        as well). With the arguments of the last `create_model_card` call, if any. Only for a transformers model
        (or a PEFT adapter of one): this card's metadata describes one; a diffusers UNet saves none."""
        self._write_card(folder, any_model=False)

    def _write_card(self, folder: str, any_model: bool) -> None:
        """The card into `folder`; `any_model=False` skips a model that is not a transformers one."""
        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if is_peft_model(model) else model
        if not (any_model or isinstance(base, PreTrainedModel)):
            return
        arguments = {**CARD_DEFAULTS, **self._card_arguments}
        evaluation = arguments.pop("evaluation")
        privacy = getattr(self, "starting_privacy", None)
        if privacy is not None:
            arguments["guarantees"] = [
                privacy.card_section("The starting model of this run"),
                *arguments["guarantees"],
            ]
        ours = [*BASE_TAGS, self.strategy.name, *arguments["tags"]]
        starting_tags = (base.model_tags or []) if isinstance(base, PreTrainedModel) else []
        card = build_model_card(
            strategy_name=self.strategy.name,
            paper=self.strategy.paper,
            hyperparameters=self.strategy.hyperparameters,
            training_args={**training_arguments(self.args), "reference_mode": self.reference_mode},
            forget_rows=self.forget_rows,
            forget_rows_fingerprint=self._forget_fingerprint,
            retain_count=len(self.retain_rows) if self.retain_rows is not None else None,
            base_model=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            is_adapter=is_peft_model(model) and not self.args.merge_adapter,
            evaluation=evaluation if evaluation is not None else self.last_evaluation,
            text_format=self.text_format_record(),
            coreset=self.coreset.card_line() if getattr(self, "coreset", None) is not None else None,
            **arguments,
        )
        # PEFT copies the starting model's `model_tags` (TRL's `trl`, `sft`, ...) into its README: not ours
        write_model_card(card, folder, foreign_tags=[t for t in starting_tags if t not in ours])

    def text_format_record(self) -> dict[str, Any] | None:
        """How this run rendered its rows, for the card and the run record (`text_format.json`): the trainer's
        `TextFormat.describe` with its row formats (``rows``), the window length (``max_length``) and
        ``window_stride``; None for a model family whose collator renders no text (classifiers, diffusion)."""
        text_format = getattr(self, "text_format", None)
        if text_format is None:
            return None
        described = text_format.describe(self.processing_class, getattr(self, "row_formats", None))
        return {**described, "max_length": self.args.max_length, "window_stride": text_format.window_stride}

    @functools.cached_property
    def _forget_fingerprint(self) -> str:
        """The forget rows' fingerprint, computed once per run: every save writes the card again, the rows stay."""
        return forget_fingerprint(self.forget_rows)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the model repo `args.hub_model_id` (default: the output folder's name) as `Trainer.init_hf_repo`
        does (at construction with `args.push_to_hub`), through `erasus_hf.hub.push`: an `HfApi` at the current
        endpoint, errors explained, the token scrubbed.

        With `args.push_to_hub`, hub_strategy "checkpoint" and "all_checkpoints" are refused: they upload the
        resumable checkpoint folders (optimizer, scheduler and RNG states, pickled), and erasus_hf never uploads a
        checkpoint (see `_push_from_checkpoint`)."""
        if self.args.push_to_hub and self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            raise ValueError(
                f"hub_strategy={self.args.hub_strategy.value!r} uploads the training checkpoints (optimizer, "
                "scheduler and RNG states, pickled); erasus_hf never uploads a checkpoint. Use "
                "hub_strategy='every_save' (the weights at each save) or 'end' (only the final push_to_hub), and "
                "resume from the local checkpoint-* folders."
            )
        self.push_in_progress = None
        if not self.is_world_process_zero():
            return
        self.hub_model_id = create_model_repo(
            self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            private=self.args.hub_private_repo if private is None else private,
            token=self.args.hub_token if token is None else token,
        )

    def push_to_hub(
        self,
        commit_message: str | None = None,
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        *,
        repo_id: str | None = None,
        evaluation: EvaluationResult | None = None,
        **card_kwargs: Any,
    ) -> str | Future | None:
        """Save the weights (safetensors), the evaluation JSON and the model card to `output_dir`, then upload the
        folder's shippable files in one commit to `repo_id` (default: the repo `args.push_to_hub` created, else
        `args.hub_model_id`) on `revision` (default: `args.hub_revision`, else main). Return the commit URL, or with
        `blocking=False` a `Future` of it (the folder is validated first); None on the other processes (only the
        main process pushes, as with the Trainer).

        `Trainer.push_to_hub`'s arguments, in its order (`private` applies only when the repo is created);
        `card_kwargs` go to `create_model_card`. An in-flight checkpoint push is waited for first, so the final
        commit lands last. Checkpoints, optimizer and RNG states are never uploaded."""
        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        if not repo_id and not self.args.push_to_hub:  # with the flag, init_hf_repo named it (on process zero)
            raise ValueError("push_to_hub needs a repo_id (or args.hub_model_id).")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self.save_model(_internal_call=True)  # not save_model(): with args.push_to_hub it pushes, i.e. calls us
        evaluation = evaluation if evaluation is not None else self.last_evaluation
        self.create_model_card(evaluation=evaluation, **card_kwargs)
        if evaluation is not None and self.args.should_save:
            evaluation.save(os.path.join(self.args.output_dir, "eval.json"))
        if not self.is_world_process_zero():
            return None
        push = functools.partial(
            push_output,
            self.args.output_dir,
            repo_id,
            private=self.args.hub_private_repo if private is None else private,
            token=token or self.args.hub_token,
            commit_message=commit_message,
            revision=revision if revision is not None else self.args.hub_revision,
        )
        self._finish_current_push()
        if blocking:
            return push()
        files_to_push(self.args.output_dir)  # a bad folder is refused here, not in the background
        return self._push_in_background(push)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push a checkpoint save's weights to the repo root, as `Trainer._push_from_checkpoint` does with
        `args.push_to_hub` and hub_strategy "every_save" ("end" pushes nothing here): in the background, commit
        "Training in progress, step N" (epoch N), a save skipped while the previous push is in flight unless
        `hub_always_push`.

        Unlike the Trainer, only what `files_to_push` ships from the checkpoint folder goes up (weights, configs,
        tokenizer, unlearning config): never the checkpoint folder (no `last-checkpoint/`, see `init_hf_repo`),
        the optimizer, scheduler, RNG or trainer state, nor `training_args.bin` (the Trainer writes it to
        `output_dir` and uploads it), nor a card: ours comes with the final `push_to_hub`, with the evaluation.
        The files are hard-linked (copied where links fail) into a private `_hub_push-*` folder of `output_dir`
        first, so rotating the checkpoint away (`save_total_limit`) cannot pull them from under the upload; the
        folder is removed when the push ends. A failed push is logged and training goes on."""
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        staging = _linked_copy(checkpoint_folder, files_to_push(checkpoint_folder, card=False), self.args.output_dir)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        repo_id, token, revision = self.hub_model_id, self.args.hub_token, self.args.hub_revision

        def push() -> str:
            try:
                return push_output(
                    staging, repo_id, token=token, commit_message=message, revision=revision, card=False
                )
            except Exception as err:
                logger.warning("%s: pushing to %s failed (training goes on): %s", message, repo_id, err)
                raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        self._push_in_background(push)

    def _push_in_background(self, push: Callable[[], str]) -> Future:
        """Run `push` on the trainer's one upload thread (pushes land in order) and track it as the Trainer tracks
        its own (`push_in_progress`), so `train()` and `push_to_hub()` wait for it (`_finish_current_push`)."""
        if self._hub_pool is None:
            self._hub_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="erasus-hub-push")
        job = self._hub_pool.submit(push)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)
        return job


def _linked_copy(folder: str, names: list[str], parent: str) -> str:
    """A new private `_hub_push-*` folder in `parent` holding `names` of `folder`, hard-linked (copied where links
    fail); return its path."""
    staging = tempfile.mkdtemp(prefix="_hub_push-", dir=parent)
    for name in names:
        source, target = os.path.join(folder, name), os.path.join(staging, name)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    return staging
