"""Fixed features for a certified-removal head: hidden states of a frozen `transformers` body, or pixels.

Guo et al.'s certificate holds for a linear head on features that do not depend on the training rows. For a deep
model that means a body that is frozen while the head trains and was pre-trained on public data (or on data that
will never be deleted); only the head is certified. The body here must be frozen (no parameter requires a gradient):
the extractor refuses a trainable one rather than guess whether it will change. It cannot check where the body's
weights came from: that is the user's statement, carried into the certificate as `source`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .certificate import AssumptionError

POOLINGS = ("mean", "last")


@dataclass(frozen=True)
class FixedFeatures:
    """Features (n x d, detached, float32 or float64) and where they came from (shown in the certificate)."""

    values: torch.Tensor
    source: str

    def __len__(self) -> int:
        return self.values.shape[0]


def check_frozen(body: nn.Module) -> None:
    """Refuse a body with trainable parameters: features from a body that may still train are not fixed, and the
    certificate covers a head on fixed features only."""
    trainable = [name for name, param in body.named_parameters() if param.requires_grad]
    if trainable:
        raise AssumptionError(
            f"features are not fixed: the body {type(body).__name__} has {len(trainable)} trainable parameters "
            f"(first: {trainable[0]!r}). Guo et al.'s certificate covers a linear head on fixed features of a frozen "
            "or publicly pre-trained body. Freeze it (body.requires_grad_(False)) and use a body that never trained "
            "on the rows that may be deleted; only the head is certified."
        )


def normalize_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm, as the paper does (its bounds assume ||x|| <= 1); zero rows stay zero."""
    norms = values.norm(dim=1, keepdim=True)
    return values / torch.where(norms > 0, norms, torch.ones_like(norms))


@torch.no_grad()
def hidden_state_features(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    pooling: str = "mean",
    layer: int = -1,
    batch_size: int = 16,
    max_length: int | None = None,
    source: str | None = None,
) -> FixedFeatures:
    """Hidden states of a frozen `transformers` model, one vector per text: the layer's states mean-pooled over the
    text's tokens (``pooling="mean"``) or at its last token (``"last"``, the last non-padding position whichever side
    the tokenizer pads). The model runs in eval mode (no dropout); its training mode is restored after."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}.")
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty sequence of strings (one per row).")
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"texts[{index}] is {text!r}: every row needs a non-empty string.")
    check_frozen(model)
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token, so texts cannot be batched: set tokenizer.pad_token (e.g. to its EOS)."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=max_length is not None,
                max_length=max_length,
            ).to(device)
            outputs = model(**batch, output_hidden_states=True)
            if getattr(outputs, "hidden_states", None) is None:
                raise ValueError(
                    f"{type(model).__name__} returned no hidden_states: use a transformers model whose forward "
                    "accepts output_hidden_states=True (for an encoder-decoder, pass its encoder)."
                )
            chunks.append(_pool(outputs.hidden_states[layer], batch["attention_mask"], pooling).float().cpu())
    finally:
        model.train(was_training)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    described = source or f"{pooling}-pooled hidden states (layer {layer}) of the frozen {name}"
    return FixedFeatures(torch.cat(chunks), described)


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    mask = mask.to(states.dtype)
    if pooling == "mean":
        return (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(dim=1)  # the last position that is not padding, padded left or right
    return states[torch.arange(states.shape[0], device=states.device), last]


def pixel_features(images: np.ndarray | torch.Tensor, max_value: float | None = None) -> FixedFeatures:
    """Raw pixels as features (the paper's MNIST setting): each image flattened, scaled to [0, 1] by `max_value`
    (default: the largest pixel) and centred by subtracting 0.5. The head normalises each row to unit norm."""
    values = torch.as_tensor(np.asarray(images), dtype=torch.float64)
    if values.ndim < 2:
        raise ValueError(f"images has shape {tuple(values.shape)}: expected one image (or vector) per row.")
    values = values.reshape(values.shape[0], -1)
    scale = float(values.max()) if max_value is None else float(max_value)
    if not scale > 0:
        raise ValueError(f"max_value={scale}: pixels are scaled to [0, 1] by a positive maximum.")
    return FixedFeatures(values / scale - 0.5, f"pixels scaled to [0, 1] and centred (x / {scale:g} - 0.5)")
