"""The frozen starting model, asked the same questions as the model being unlearned.

Three ways to answer, one interface (a strategy never knows which it got):

- `ModelReference` over the PEFT model with its adapter disabled (no extra weights), over a frozen snapshot of a
  pre-trained adapter, or over a frozen copy of the whole model;
- `CachedReference`: sequence log-probs of the fixed forget examples, computed once before training, for strategies
  (NPO, DPO-style) that need nothing else.

`resolve_reference_mode` picks the way from `UnlearningConfig.reference` and what the strategy needs,
`check_reference_model` refuses a `ref_model` that cannot be the starting model, and `build_reference` builds it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Collection, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import zero3
from .objectives import Objective, Scores
from .peft_utils import REFERENCE_ADAPTER, is_peft_model

logger = logging.getLogger(__name__)

# what a reference must share with the model for its log-probs, logits and hidden states to line up
REFERENCE_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_labels")


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
        self._placed: tuple[torch.Tensor, torch.Tensor] | None = None  # (logprobs, their copy on the batches' device)

    def _on(self, device: torch.device) -> torch.Tensor:
        """`logprobs` on `device`, copied there once rather than at every step (and again when `logprobs` is
        replaced, as a resumed run does)."""
        if self._placed is None or self._placed[0] is not self.logprobs or self._placed[1].device != device:
            self._placed = (self.logprobs, self.logprobs.to(device))
        return self._placed[1]

    def sequence_logprob(self, objective: Objective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "index" not in batch:
            raise ValueError("reference='cached' needs forget batches that carry their `index`.")
        index = batch["index"]
        slot = batch.get("slot", torch.zeros_like(index))
        value = self._on(index.device)[index, slot]
        if torch.isnan(value).any():
            raise ValueError("No cached reference log-prob for some examples of this batch.")
        return value


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy that runs its own weights.

    Some trainers patch `model.forward` on the instance with a closure over the original model (TRL's SFTTrainer
    does, for its fused LM head); a deep copy would keep calling the original, so the "frozen" reference would move
    with the policy. The copy falls back to its class's forward.

    A model partitioned by DeepSpeed ZeRO-3 (`zero.Init`, as `from_pretrained` loads under a ZeRO-3 config) holds
    only its own slice of each weight, and a deep copy copies the partitioning's bookkeeping without the weights: the
    copy gets the gathered weights instead, whole, and `prepare_deepspeed` partitions it again (each process holds
    the whole copy until then; a `ref_model` loaded by `from_pretrained` under the ZeRO-3 config avoids that peak).
    """
    ref = zero3.whole_copy(model) if zero3.is_partitioned(model) else copy.deepcopy(model)
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


def resolve_reference_mode(
    requested: str,
    needs: Collection[str],
    strategy_name: str,
    retain_loss_name: str,
    peft: bool,
    ref_model: nn.Module | None,
    cacheable: bool = True,
) -> str:
    """The reference mode to build: 'none' | 'cached' | 'adapter' | 'copy' (see `UnlearningConfig.reference`), for a
    strategy whose loss reads the reference quantities `needs` (`Strategy.reference_quantities`). `cacheable` is
    False for objectives whose per-example scores depend on the rest of the batch (contrastive)."""
    if not needs:
        if requested not in ("auto", "none") or ref_model is not None:
            logger.warning("Strategy %r needs no reference model; none is built.", strategy_name)
        return "none"
    what = f"strategy {strategy_name!r} with retain_loss={retain_loss_name!r}"
    if requested == "none":
        raise ValueError(f"{what} needs a reference model; set reference to 'auto', 'adapter', 'copy' or 'cached'.")
    if requested == "auto":
        if set(needs) == {"sequence_logprob"} and cacheable:
            return "cached"
        return "copy" if ref_model is not None or not peft else "adapter"
    if requested == "cached" and not cacheable:
        raise ValueError(
            f"{what}: the objective's log-probs depend on the whole batch, so they cannot be cached per example; use "
            "reference='adapter' (with PEFT) or 'copy'."
        )
    if requested == "cached" and "scores" in needs:
        raise ValueError(f"{what} needs reference logits, which reference='cached' cannot give; use adapter or copy.")
    if requested == "adapter" and not peft:
        raise ValueError("reference='adapter' needs a PEFT model: set use_peft=True or pass peft_config.")
    if requested == "adapter" and ref_model is not None:
        raise ValueError("reference='adapter' uses the model itself; do not pass ref_model as well.")
    return requested


def check_same_vocabulary(model: nn.Module, ref_model: nn.Module) -> None:
    """Refuse a reference whose vocabulary differs from the model's: log-prob ratios between them mean nothing."""

    def vocab(m: nn.Module) -> int | None:
        return getattr(getattr(m, "config", None), "vocab_size", None)

    if vocab(model) != vocab(ref_model):
        raise ValueError(
            f"The reference model's vocabulary ({vocab(ref_model)}) differs from the model's ({vocab(model)}); "
            "log-prob ratios between them are meaningless."
        )


def check_reference_model(model: nn.Module, ref_model: nn.Module) -> None:
    """Refuse a `ref_model` that cannot be the starting model: another vocabulary, class, `model_type`, hidden size,
    depth or label count (a shape error mid-step otherwise, or log-prob ratios between unrelated models)."""
    check_same_vocabulary(model, ref_model)

    def base(m: nn.Module) -> nn.Module:
        return m.get_base_model() if is_peft_model(m) else m

    model, ref_model = base(model), base(ref_model)
    differences = []
    if type(model).__name__ != type(ref_model).__name__:
        differences.append(f"class {type(ref_model).__name__} vs {type(model).__name__}")
    config, ref_config = getattr(model, "config", None), getattr(ref_model, "config", None)
    for name in REFERENCE_CONFIG_FIELDS:
        mine, theirs = getattr(config, name, None), getattr(ref_config, name, None)
        if mine is not None and theirs is not None and mine != theirs:
            differences.append(f"{name} {theirs!r} vs {mine!r}")
    if differences:
        raise ValueError(
            f"ref_model is not the model's architecture (ref_model vs model: {', '.join(differences)}). The "
            "reference is the starting model: pass a frozen copy of it, or leave ref_model=None to have one built "
            "(UnlearningConfig.reference)."
        )


def build_reference(
    mode: str,
    model: nn.Module,
    objective: Objective,
    ref_model: nn.Module | None,
    had_adapter: bool,
    *,
    accelerator: Accelerator,
    deepspeed: bool,
    cache_loaders: Sequence[DataLoader],
    device: torch.device | str,
    disable_tqdm: bool = False,
) -> Reference | None:
    """The reference `mode` asks for (`resolve_reference_mode`), for the trainer's (prepared) `model`.

    The objective's own first (`Objective.build_reference`: diffusion's UNet reference), else: "cached", the forget
    sides of `cache_loaders` scored once by `ref_model` or `model`; "adapter", `model` with its adapter off (or the
    snapshot of the adapter it arrived with); "copy", `ref_model` frozen and placed as the policy is (sharded under
    DeepSpeed ZeRO-3 by TRL's `prepare_deepspeed`)."""
    if mode == "none":
        return None
    family = objective.build_reference(model, mode, ref_model, had_adapter)
    if family is not None:
        return family
    if mode == "cached":
        scorer = ref_model.to(device) if ref_model is not None else model
        batches = (batch["forget"] for loader in cache_loaders for batch in loader)
        total = sum(len(loader) for loader in cache_loaders)
        bar = tqdm(batches, total=total, desc="Reference log-probs (cached)", disable=disable_tqdm)
        return CachedReference(sequence_logprobs(scorer, objective, bar, device))
    if mode == "adapter":
        return adapter_reference(model, had_adapter)
    return copy_reference(ref_model, accelerator, deepspeed)


def adapter_reference(peft_model: nn.Module, had_adapter: bool) -> ModelReference:
    """The PEFT model itself as the reference: adapter off, or the frozen snapshot of the adapter it arrived with."""
    if had_adapter:
        name = snapshot_adapter(peft_model)
        return ModelReference(peft_model, "adapter", lambda: active_adapter(peft_model, name))
    return ModelReference(peft_model, "adapter", peft_model.disable_adapter)


def copy_reference(ref_model: nn.Module, accelerator: Accelerator, deepspeed: bool) -> ModelReference:
    """`ref_model` frozen, on the right device, sharded like the policy under DeepSpeed ZeRO-3 and FSDP (TRL's
    `prepare_deepspeed` / `prepare_fsdp`): `prepare_model(evaluation_mode=True)` would hold a whole copy on every
    process, which is what sharding the policy was meant to avoid."""
    ref_model.requires_grad_(False)
    ref_model.eval()
    if deepspeed:
        from trl.models.utils import prepare_deepspeed

        ref_model = prepare_deepspeed(ref_model, accelerator)
    elif accelerator.distributed_type == DistributedType.FSDP:
        from trl.models.utils import prepare_fsdp

        ref_model = prepare_fsdp(ref_model, accelerator)
    else:
        ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)
    return ModelReference(ref_model, "copy", contextlib.nullcontext)
