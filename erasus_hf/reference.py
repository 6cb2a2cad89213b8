"""The frozen starting model, asked the same questions as the model being unlearned.

Three ways to answer, one interface (a strategy never knows which it got):

- `ModelReference` over the PEFT model with its adapter disabled (no extra weights), over a frozen snapshot of a
  pre-trained adapter, or over a frozen copy of the whole model;
- `CachedReference`: sequence log-probs of the fixed forget examples, computed once before training, for strategies
  (NPO, DPO-style) that need nothing else.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .objectives import Objective, Scores
from .peft_utils import REFERENCE_ADAPTER  # noqa: F401  (re-exported: the name the reference adapter has)


class Reference:
    """What strategies may ask of the starting model. All calls run without gradients."""

    mode: str

    def scores(self, objective: Objective, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        raise NotImplementedError(f"reference={self.mode!r} answers sequence log-probs only.")

    def sequence_logprob(self, objective: Objective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(objective, batch).sequence_logprob


class ModelReference(Reference):
    """A reference that runs a model: `model` inside `context()` (adapter off, snapshot adapter on, or a copy)."""

    def __init__(self, model: nn.Module, mode: str, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.model = model
        self.mode = mode
        self._context = context

    @torch.no_grad()
    def scores(self, objective: Objective, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        with self._context(), eval_mode(self.model):
            return objective.score(self.model, batch, hidden_layer=hidden_layer)


class CachedReference(Reference):
    """Sequence log-probs looked up by the `index` each forget example carries, in column `slot` (0 = the forget
    answer, 1 = a DPO-style alternate answer)."""

    mode = "cached"

    def __init__(self, logprobs: torch.Tensor) -> None:
        self.logprobs = logprobs if logprobs.dim() == 2 else logprobs[:, None]

    def sequence_logprob(self, objective: Objective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "index" not in batch:
            raise ValueError("reference='cached' needs forget batches that carry their `index`.")
        index = batch["index"]
        slot = batch.get("slot", torch.zeros_like(index))
        value = self.logprobs.to(index.device)[index, slot]
        if torch.isnan(value).any():
            raise ValueError("No cached reference log-prob for some examples of this batch.")
        return value


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy that runs its own weights.

    Some trainers patch `model.forward` on the instance with a closure over the original model (TRL's SFTTrainer
    does, for its fused LM head); a deep copy would keep calling the original, so the "frozen" reference would move
    with the policy. The copy falls back to its class's forward.
    """
    ref = copy.deepcopy(model)
    ref.__dict__.pop("forward", None)
    return ref


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the reference forward, restoring the training mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run `model` (a PeftModel) with adapter `name`, then give the trainable adapter back its gradients."""
    previous = model.active_adapter
    model.base_model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.base_model.set_adapter(previous)


def snapshot_adapter(model: nn.Module) -> str:
    """Copy the active (pre-trained) adapter into a frozen reference adapter; return its name.

    When a model arrives with a trained adapter, adapter-off would be the base model, not the starting model; the
    snapshot keeps the starting adapter at the cost of one adapter's weights.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = model.active_adapter
    if REFERENCE_ADAPTER not in model.peft_config:
        model.add_adapter(REFERENCE_ADAPTER, model.peft_config[active])
        state = get_peft_model_state_dict(model, adapter_name=active)
        set_peft_model_state_dict(model, state, adapter_name=REFERENCE_ADAPTER)
    model.base_model.set_adapter(active)  # trainable again; the snapshot stays frozen
    return REFERENCE_ADAPTER


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, objective: Objective, batches: list[dict[str, torch.Tensor]] | Iterator, device: torch.device
) -> torch.Tensor:
    """[max index + 1, 2] sequence log-probs of every forget example (slot 0) and of its alternate answer when the
    batch carries one (slot 1), at each example's `index`; NaN where there is nothing."""
    values: dict[tuple[int, int], float] = {}
    with eval_mode(model):
        for batch in batches:
            for side, slot in ((batch, 0), (batch.get("alternate"), 1)):
                if side is None:
                    continue
                side = {k: v.to(device) for k, v in side.items() if isinstance(v, torch.Tensor)}
                logprob = objective.score(model, side).sequence_logprob.float().cpu()
                values.update({(i, slot): v for i, v in zip(side["index"].tolist(), logprob.tolist(), strict=True)})
    cache = torch.full((max(i for i, _ in values) + 1, 2), float("nan"))
    for (index, slot), value in values.items():
        cache[index, slot] = value
    return cache
