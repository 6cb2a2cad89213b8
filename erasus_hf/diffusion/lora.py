"""What the diffusion code asks of a diffusers UNet itself: is it a conditional UNet, does it carry a LoRA adapter,
and running it with that adapter off (the frozen reference of an adapter run). The objective, the strategies and
saving all ask here, so none of them imports another for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def is_diffusion_unet(model: nn.Module) -> bool:
    """A diffusers conditional UNet (checked by its config, so subclasses and compiled wrappers count)."""
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "cross_attention_dim") and hasattr(config, "in_channels")


def has_lora(unet: nn.Module) -> bool:
    """Whether a diffusers model carries a PEFT adapter added with `unet.add_adapter` / `load_lora_weights`."""
    return bool(getattr(unet, "_hf_peft_config_loaded", False))


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Run the UNet with its LoRA adapters off (the base weights), then switch them back on.

    diffusers' `enable_adapters()` marks every parameter of the active adapter trainable again (PEFT's
    `set_adapter`), which would undo a strategy's choice of trained parameters (ESD-x trains only the cross-attention
    LoRA); the `requires_grad` flags are restored as they were.
    """
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()
        for param, flag in flags:
            param.requires_grad_(flag)
