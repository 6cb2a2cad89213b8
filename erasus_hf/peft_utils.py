"""PEFT adapters as the unlearning delta."""

from __future__ import annotations

import copy
import os
import warnings
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from . import zero3

if TYPE_CHECKING:  # a type hint only: the config sits above this room
    from .config import UnlearningConfig

# the frozen snapshot of an arrived adapter that serves as the reference (`erasus_hf.reference.snapshot_adapter`)
REFERENCE_ADAPTER = "erasus_reference"

# `PeftModel.__init__` (every LoRA wrap and `PeftModel.from_pretrained`) reads transformers 5's deprecated
# `is_gradient_checkpointing`, a FutureWarning users can do nothing about; only that message is silenced
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep plain-torch use working without it
        return False
    return isinstance(model, PeftModel)


def prepare_peft(
    model: nn.Module, args: UnlearningConfig, peft_config=None, task_type: str | None = None
) -> tuple[nn.Module, str | None, bool]:
    """Wrap `model` with a LoRA adapter when asked; return (model, trainable adapter name, had a trained adapter).

    A model that already is a `PeftModel` keeps its adapter, which is made trainable (`PeftModel.from_pretrained`
    loads adapters frozen); the caller snapshots it as the reference, since adapter-off is not the starting model.
    """
    from peft import LoraConfig, get_peft_model

    if is_peft_model(model):
        if peft_config is not None:
            raise ValueError("The model already carries a PEFT adapter; pass peft_config=None to unlearn through it.")
        name = model.active_adapter
        model.base_model.set_adapter(name)
        return _with_input_grads(model, args), name, True
    if peft_config is None and args.use_peft:
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules or "all-linear",
            task_type=task_type,
        )
    if peft_config is None:
        return model, None, False
    return _with_input_grads(get_peft_model(model, peft_config), args), "default", False


def _with_input_grads(model: nn.Module, args: UnlearningConfig) -> nn.Module:
    """Make the embeddings' output require gradients when training an adapter under gradient checkpointing.

    The base weights are frozen, so with reentrant checkpointing no input of a checkpointed layer requires a
    gradient and the adapter inside it gets none: LoRA weights that never move (open-unlearning's issue #178), or
    "element 0 of tensors does not require grad" when nothing else trains. TRL's SFTTrainer calls
    `enable_input_require_grads` for the same reason, not relying on the Trainer's own call."""
    checkpointing = getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False)
    if checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


def save_weights(
    model: nn.Module, output_dir: str, adapter_name: str | None, merge_adapter: bool, state_dict: dict | None = None
) -> None:
    """Write `model`'s weights as safetensors: with PEFT the trainable adapter alone (never the reference snapshot),
    or the merged model with `merge_adapter`; a `PreTrainedModel` through `save_pretrained`; any other module's state
    dict as `model.safetensors`."""
    if is_peft_model(model) and merge_adapter:
        if zero3.is_partitioned(model) and state_dict is None:  # gathering here would wait for the other processes
            raise ValueError("A ZeRO-3 partitioned model merges from its gathered state_dict; none was given.")
        # under ZeRO-3 a deep copy holds empty slices: merge the whole weights gathered into `state_dict`
        merged = zero3.whole_copy(model, state_dict) if zero3.is_partitioned(model) else copy.deepcopy(model)
        if REFERENCE_ADAPTER in merged.peft_config:
            merged.delete_adapter(REFERENCE_ADAPTER)
        merged.merge_and_unload().save_pretrained(output_dir)
    elif is_peft_model(model):
        model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=[adapter_name])
    elif isinstance(model, PreTrainedModel):
        model.save_pretrained(output_dir, state_dict=state_dict)
    else:
        state_dict = state_dict if state_dict is not None else model.state_dict()
        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(output_dir, "model.safetensors"))
