"""Per-example features for coreset selection, computed through the model family's objective, so every family whose
objective gives hidden states (causal LMs, seq2seq, classifiers, CTC, vision-language) can be reduced.

- ``embeddings``: the last hidden layer, mean-pooled over the example's tokens (`attention_mask`), [n, H];
- ``losses``: the mean NLL of the scored tokens (`Scores.mean_nll`), [n];
- ``el2n``: the mean over the scored tokens of || softmax(logits) - onehot(target) ||_2, from the target's
  probability p_y: sqrt(sum_v p_v^2 - 2 p_y + 1), [n];
- ``gradient_norms`` and ``gradients``: the gradient of each example's loss on the trainable parameters (the LoRA
  adapter under PEFT), one example at a time with `torch.func.grad` over `torch.func.functional_call`, so memory
  holds one example's gradient whatever the set's size; ``gradients`` are CountSketched to `sketch_dim` numbers
  (each coordinate added with a random sign into one of `sketch_dim` buckets, seeded: inner products are kept in
  expectation), [n, sketch_dim].

All are computed in eval mode (no dropout) and without changing the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

if TYPE_CHECKING:  # the objectives import the config, which imports this package's options
    from ..objectives import Objective


MAX_SKETCHED_PARAMETERS = 200_000_000  # a bucket and a sign per trainable parameter: 1.8 GB at this size


def _pooled(hidden: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    if hidden.dim() == 2:
        return hidden
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.shape == hidden.shape[:2]:
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)
    return hidden.mean(1)  # no token mask aligned with the states (audio frames, image patches)


def _el2n(scores) -> torch.Tensor:
    if scores.logits is None:
        raise ValueError("EL2N scores need the logits of every target token; this objective gives none.")
    squared = scores.logits.float().softmax(-1).pow(2).sum(-1)
    per_token = (squared - 2 * scores.token_logprobs.float().exp() + 1).clamp_min(0).sqrt() * scores.mask
    return per_token.sum(-1) / scores.mask.sum(-1).clamp_min(1)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _ExampleLoss(nn.Module):
    """The objective's mean NLL of a batch as a module, so `functional_call` can swap the model's parameters."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.objective.score(self.model, batch).mean_nll.sum()


class CountSketch:
    """A seeded CountSketch of vectors split into named parts (one per parameter tensor) into `dim` buckets."""

    def __init__(self, sizes: dict[str, int], dim: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim
        self.buckets = {k: torch.randint(dim, (n,), generator=generator) for k, n in sizes.items()}
        self.signs = {k: torch.randint(2, (n,), generator=generator).float() * 2 - 1 for k, n in sizes.items()}

    def __call__(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(self.dim)
        for name, value in parts.items():
            out.index_add_(0, self.buckets[name], value.detach().float().reshape(-1).cpu() * self.signs[name])
        return out


def example_features(
    kind: str,
    model: nn.Module,
    objective: Objective,
    collator: Callable[[list[dict]], dict[str, Any]],
    dataset: Any,
    *,
    batch_size: int = 16,
    seed: int = 0,
    sketch_dim: int = 512,
    desc: str | None = None,
    disable_tqdm: bool = False,
) -> np.ndarray:
    """Features of `kind` (module docstring) for every row of `dataset` (rows the side `collator` batches), in the
    dataset's order, on the device the model is on."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        if kind in ("gradients", "gradient_norms"):
            return _gradient_features(
                kind, model, objective, collator, dataset, device, seed, sketch_dim, desc, disable_tqdm
            )
        if kind not in ("embeddings", "losses", "el2n"):
            raise ValueError(
                f"Unknown feature kind {kind!r}; valid: embeddings, losses, el2n, gradients, gradient_norms"
            )
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
        rows = []
        with torch.no_grad():
            for batch in tqdm(loader, desc=desc or f"Coreset {kind}", disable=disable_tqdm):
                batch = _to(batch, device)
                if kind == "embeddings":
                    scores = objective.score(model, batch, hidden_layer=-1)
                    if scores.hidden_states is None:
                        raise ValueError(f"The {objective.name!r} objective gives no hidden states for embeddings.")
                    rows.append(_pooled(scores.hidden_states.float(), batch).cpu())
                else:
                    scores = objective.score(model, batch)
                    rows.append((scores.mean_nll if kind == "losses" else _el2n(scores)).float().cpu())
        return torch.cat(rows).numpy().astype(np.float64)
    finally:
        model.train(was_training)


def _gradient_features(kind, model, objective, collator, dataset, device, seed, sketch_dim, desc, disable_tqdm):
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("Gradient features need trainable parameters; the model has none (all frozen).")
    count = sum(p.numel() for p in trainable.values())
    if kind == "gradients" and count > MAX_SKETCHED_PARAMETERS:
        raise ValueError(
            f"Gradient features sketch every trainable parameter of every row: {count:,} trainable parameters is "
            f"more than {MAX_SKETCHED_PARAMETERS:,}. Train a LoRA adapter (use_peft=True) or select on embeddings."
        )
    loss = _ExampleLoss(model, objective)
    params = {f"model.{name}": p.detach() for name, p in trainable.items()}
    gradient = grad(lambda p, batch: functional_call(loss, p, (batch,), strict=False))
    sketch = CountSketch({k: v.numel() for k, v in params.items()}, sketch_dim, seed) if kind == "gradients" else None
    rows = []
    for i in tqdm(range(len(dataset)), desc=desc or f"Coreset {kind}", disable=disable_tqdm):
        parts = gradient(params, _to(collator([dataset[i]]), device))
        if sketch is None:
            rows.append(torch.sqrt(sum(g.float().pow(2).sum() for g in parts.values())).cpu())
        else:
            rows.append(sketch(parts))
    return torch.stack(rows).numpy().astype(np.float64)
