"""Save what an erasure changed (the UNet LoRA, or only the trained UNet tensors) as safetensors, and load it back
into a `StableDiffusionPipeline`-style pipeline."""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .lora import has_lora

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' name, read by `pipe.load_lora_weights(folder)`
TRAINED_WEIGHTS = "unet_erased.safetensors"


def save_erasure(unet: nn.Module, output_dir: str) -> list[str]:
    """With a LoRA adapter: the adapter in diffusers' format (`StableDiffusionPipeline.save_lora_weights`, with its
    rank/alpha metadata). Without: the UNet tensors the run trained or edited (those with `requires_grad`), under
    their UNet state-dict names. Returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    if has_lora(unet):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        name = unet.active_adapters()[0]
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
        StableDiffusionPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=layers,
            safe_serialization=True,
            unet_lora_adapter_metadata=unet.peft_config[name].to_dict(),
        )
        return [os.path.join(output_dir, LORA_WEIGHTS)]
    trained = {name: p.detach().contiguous().cpu() for name, p in unet.named_parameters() if p.requires_grad}
    if not trained:
        raise ValueError("No UNet parameter is marked trained (requires_grad); nothing to save.")
    path = os.path.join(output_dir, TRAINED_WEIGHTS)
    save_file(trained, path)
    return [path]


def load_erasure(pipeline_or_unet: Any, path: str) -> Any:
    """Apply a saved erasure (a folder written by `save_erasure` / `UnlearningTrainer.save_model`) to a pipeline
    (its `unet`) or a UNet, in place; returns what it was given.

    A LoRA folder loads with `pipeline.load_lora_weights` (a bare UNet: `unet.load_lora_adapter`); trained tensors
    replace the UNet's, and a name the UNet does not have, or a shape that differs, is an error.
    """
    unet = getattr(pipeline_or_unet, "unet", pipeline_or_unet)
    lora = os.path.join(path, LORA_WEIGHTS)
    trained = os.path.join(path, TRAINED_WEIGHTS)
    if os.path.exists(lora):
        if hasattr(pipeline_or_unet, "load_lora_weights"):
            pipeline_or_unet.load_lora_weights(path, weight_name=LORA_WEIGHTS)
        else:
            unet.load_lora_adapter(path, weight_name=LORA_WEIGHTS, prefix="unet")
        return pipeline_or_unet
    if not os.path.exists(trained):
        raise FileNotFoundError(f"{path} holds neither {LORA_WEIGHTS} nor {TRAINED_WEIGHTS}.")
    tensors = load_file(trained)
    params = dict(unet.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"{len(unknown)} saved tensors are not parameters of this UNet, e.g. {unknown[:3]}.")
    wrong = [k for k, v in tensors.items() if v.shape != params[k].shape]
    if wrong:
        raise ValueError(f"Saved tensors do not match this UNet's shapes, e.g. {wrong[:3]}.")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    return pipeline_or_unet
