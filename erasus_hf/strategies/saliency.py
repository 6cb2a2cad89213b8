"""Weight-saliency masks (SalUn) and updates restricted to them, for any model family.

A strategy that trains only the salient weights builds its mask once before training (`setup(trainer)`, from the
gradient of its forget loss) and calls `MaskedUpdates.install_masks`; the trainer calls `teardown()` after training.
Its config derives from `SaliencyConfig` (the mask's size, `mask_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback

from .base import Strategy
from .config import StrategyConfig


@dataclass
class SaliencyConfig(StrategyConfig):
    """The hyperparameter every SalUn variant (classifier, diffusion) shares: how much of the model its mask keeps."""

    mask_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of the trained weights in the saliency mask, in (0, 1]: the top mask_fraction of |g| "
            "(one global ranking), g the summed forget-loss gradient; 0.5 (the released code's 50% mask)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.mask_fraction <= 1:
            raise ValueError(f"SalUn needs 0 < mask_fraction <= 1, got {self.mask_fraction}")


def saliency_masks(gradients: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """1 where |g| is among the top `fraction` of all gradient entries (one global ranking), else 0."""
    if not 0 < fraction <= 1:
        raise ValueError(f"The saliency fraction must be in (0, 1], got {fraction}")
    flat = torch.cat([g.detach().abs().flatten().cpu() for g in gradients.values()])
    keep = int(round(len(flat) * fraction))
    selected = torch.zeros(len(flat), dtype=torch.bool)
    selected[torch.argsort(flat, descending=True, stable=True)[:keep]] = True
    masks, start = {}, 0
    for name, g in gradients.items():
        masks[name] = selected[start : start + g.numel()].view(g.shape).to(device=g.device, dtype=g.dtype)
        start += g.numel()
    return masks


def kept_fraction(masks: dict[str, torch.Tensor]) -> float:
    """The fraction of mask entries that are 1."""
    return sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


class _RestoreMaskedOut(TrainerCallback):
    """After every optimizer step, put the masked-out entries back to their values at mask time."""

    def __init__(self, params: dict[str, torch.nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        self.frozen = {}
        for name, mask in masks.items():
            outside = mask == 0
            if outside.any():
                self.frozen[name] = (params[name], outside, params[name].detach()[outside].clone())

    def on_train_begin(self, args, state, control, **kwargs):
        """Take the values again once the Trainer has loaded a checkpoint's weights (on resume): the masked-out
        entries of the run's starting model, whatever model the resumed trainer was given. A fresh run: no change."""
        for name, (param, outside, _) in self.frozen.items():
            self.frozen[name] = (param, outside, param.detach()[outside].clone())

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        for param, outside, values in self.frozen.values():
            param.data[outside] = values


class MaskedUpdates(Strategy):
    """Base of the strategies that train only where a mask is 1 (put it first among a strategy's bases).

    `install_masks` (i) multiplies every gradient by its mask with a tensor hook, so the masked-out entries get a zero
    gradient and gradient clipping sees the masked gradient (SalUn's `param.grad *= mask`), and (ii) restores the
    masked-out entries after every optimizer step. The restore is what keeps them exactly fixed under optimizers that
    move weights with a zero gradient: AdamW's decoupled weight decay (theta <- theta - lr * wd * theta, applied to
    every parameter with a gradient), SGD's coupled weight decay (added to the gradient after the hook) and momentum
    carried from earlier steps. The values are stored once when the mask is built (a copy of the masked-out entries).
    """

    stateful = True  # the mask, built once from the starting model, is carried by checkpoints
    config_class = StrategyConfig  # no hyperparameter of its own; each strategy declares its config

    def __init__(self, config: StrategyConfig | None = None, /, **hyperparameters: Any) -> None:
        super().__init__(config, **hyperparameters)
        self.masks: dict[str, torch.Tensor] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._restore: _RestoreMaskedOut | None = None
        self._trainer = None  # the trainer the restore callback is added to
        self._resumed_masks: dict[str, torch.Tensor] | None = None  # a checkpoint's mask, installed by the next setup

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The installed mask, `mask.{parameter name}` -> bool tensor."""
        return {f"mask.{name}": mask.detach().bool().cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Keep a checkpoint's mask: the next `install_masks` (the strategy's `setup` on resume) installs it in place
        of the one it is given, so the resumed run trains the run's own salient weights."""
        unknown = sorted(key for key in state if not key.startswith("mask."))
        if unknown:
            raise ValueError(f"Not a saliency-mask state: keys {unknown[:5]} (expected 'mask.<parameter name>').")
        self._resumed_masks = {key.removeprefix("mask."): mask for key, mask in state.items()} or None

    def install_masks(self, trainer, masks: dict[str, torch.Tensor] | None) -> float:
        """Restrict `trainer.model`'s updates to `masks` (parameter name -> 0/1 tensor); return the kept fraction.
        After `load_state_dict`, the loaded mask is installed instead (`masks` may then be None)."""
        self.teardown()
        params = dict(trainer.model.named_parameters())
        if self._resumed_masks is not None:
            masks = {
                name: mask.to(device=params[name].device, dtype=params[name].dtype) if name in params else mask
                for name, mask in self._resumed_masks.items()
            }
            self._resumed_masks = None
        if masks is None:
            raise ValueError("install_masks needs the masks (None only after load_state_dict gave it a mask).")
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"Saliency masks for parameters the model does not have: {unknown[:5]}")
        wrong = [name for name, mask in masks.items() if mask.shape != params[name].shape]
        if wrong:
            raise ValueError(f"Saliency masks of another shape than their parameters: {wrong[:5]}")
        self.masks = masks
        self._hooks = [params[name].register_hook(lambda grad, m=mask: grad * m) for name, mask in masks.items()]
        self._restore = _RestoreMaskedOut(params, masks)
        self._trainer = trainer
        trainer.add_callback(self._restore)
        return kept_fraction(masks)

    def teardown(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._restore is not None and self._trainer is not None:
            self._trainer.remove_callback(self._restore)
        self._restore, self._trainer = None, None
