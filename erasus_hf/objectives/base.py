"""The contract between a model family and the strategies.

A strategy never calls a model itself: it asks the objective of the model's family to *score* one side of a batch,
and gets back per-token log-probabilities of the targets, their mask, the aligned logits and, on request, hidden
states. A classifier is scored as a sequence of one token (its label), so every likelihood-based strategy (GA, NPO,
SimNPO, ...) serves every family that can give a per-example likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..peft_utils import prepare_peft, save_weights
from ..registry import Registry


@dataclass
class Scores:
    """What one forward pass tells about one side of a batch.

    `token_logprobs[b, t]` is log p(target_t | context) and is 0 where `mask` is False (prompt, padding, -100).
    `logits[b, t]` are the logits that predicted target t (already shifted for causal LMs).
    """

    token_logprobs: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    hidden_states: torch.Tensor | None = None

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] number of scored (answer) tokens per example."""
        return self.mask.sum(-1)

    @property
    def sequence_logprob(self) -> torch.Tensor:
        """[B] log p(y | x): the sum of the answer tokens' log-probabilities."""
        return self.token_logprobs.sum(-1)

    @property
    def mean_nll(self) -> torch.Tensor:
        """[B] per-example negative log-likelihood, averaged over the example's answer tokens."""
        return -self.sequence_logprob / self.num_tokens.clamp_min(1)


class Objective:
    """How to score a batch for one model family. Subclasses implement `score` and `validate_model`, and `matches`
    when the family can be recognised from the model alone (`get_objective(None, model)`). The other methods and
    class attributes are the trainer's hooks into the family, declared here with the default most families use.
    """

    name: ClassVar[str]
    peft_task_type: ClassVar[str | None] = None  # PEFT's task type for the LoRA wrapper (e.g. "CAUSAL_LM")
    # whether a per-example reference log-prob can be computed once and cached: False where a score depends on the
    # rest of the batch (contrastive), so the trainer keeps the frozen model itself as the reference
    cacheable_reference: ClassVar[bool] = True
    # whether `Scores` holds per-token log-probs and the logits of each target token (CTC: a sequence likelihood only)
    supports_token_scores: ClassVar[bool] = True
    token_scores_note: ClassVar[str] = "this objective has none"
    # the side collator the objective was built with (CTC's audio, CLIP's pairs, ...), what `collator_for` gives;
    # None for families whose rows are already numeric or whose collator needs the trainer's tokenizer
    collator: Any = None  # why not, in the error that refuses a strategy

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether `model` (possibly PEFT/DDP-wrapped) belongs to this family; used for auto-detection."""
        return False

    def validate_model(self, model: nn.Module) -> None:
        """Raise a clear error when `model` cannot be scored by this objective."""

    def prepare_processing_class(self, processing_class: Any | None) -> None:
        """Refuse, or complete, the trainer's `processing_class` before anything is built, whichever collator is
        used (the tokenizer also serves saving and the evaluators). Default: nothing; a causal LM needs its
        tokenizer, with a pad token."""

    def collator_for(self, processing_class: Any | None, args: Any) -> Any | None:
        """The side collator for this family's rows when the trainer is given none (the trainer's `processing_class`
        and its `UnlearningConfig` at hand: `max_length`, `text_format()`); None means rows that are already numeric
        and stack as they are. A collator that
        subclasses `erasus_hf.data.collator.SideCollator` and tokenizes has its rows tokenized once up front.
        Default: the collator the objective was built with (`collator`)."""
        return self.collator

    def prepare_peft(self, model: nn.Module, args: Any, peft_config: Any = None) -> tuple[nn.Module, str | None, bool]:
        """Add the trainer's adapter (`peft_config`, or LoRA from `args` with `use_peft`); return (model, trainable
        adapter name or None, whether the model arrived with a trained adapter). Default: PEFT's `get_peft_model`
        with this family's `peft_task_type` (`erasus_hf.peft_utils.prepare_peft`)."""
        return prepare_peft(model, args, peft_config, task_type=self.peft_task_type)

    def build_reference(self, model: nn.Module, mode: str, ref_model: nn.Module | None, had_adapter: bool) -> Any:
        """This family's own frozen reference for `mode` ("adapter", "copy", ...), or None to have the trainer build
        the standard one (`erasus_hf.reference`). Diffusion answers with its UNet reference."""
        return None

    def save_weights(
        self, model: nn.Module, output_dir: str, adapter_name: str | None, merge_adapter: bool, state_dict=None
    ) -> None:
        """Write the weights of `model` (safetensors) into `output_dir`: the trainable adapter alone, the merged
        model with `merge_adapter`, a `PreTrainedModel`'s `save_pretrained`, or a plain module's state dict as
        `model.safetensors` (see `erasus_hf.peft_utils.save_weights`). Diffusion saves the UNet's LoRA or the
        tensors its edit changed."""
        save_weights(model, output_dir, adapter_name, merge_adapter, state_dict)

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        raise NotImplementedError

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].shape[0]


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by `cls.name`; a taken name raises. Auto-detection tries
    objectives in registration order, so register the more specific families first."""
    return OBJECTIVES.register(cls, cls.name)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT or DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
        else:
            return model


def token_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label) and the mask of scored positions, for logits [B, T, V] aligned with labels [B, T].

    Uses a fused cross-entropy in the logits' own dtype, so no float32 log-softmax over the whole vocabulary is
    materialised; positions labelled -100 give 0 and are left out of the mask.
    """
    mask = labels != -100
    nll = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return -nll, mask
