"""Representation Misdirection for Unlearning (RMU), the WMDP paper's method."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..objectives import Objective, Scores
from ..peft_utils import is_peft_model
from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The decoder layers of `model`, by index: every module named `...layers.{i}` (Llama/Mistral/Qwen/Gemma naming,
    also under PEFT, DDP or any wrapper that keeps the module names)."""
    layers: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        if match and int(match.group(1)) not in layers:
            layers[int(match.group(1))] = module
    return layers


def num_hidden_layers(model: nn.Module) -> int:
    """`config.num_hidden_layers` when the model (or the model it wraps) has one, else the decoder layers found."""
    inner: object = model
    for _ in range(8):  # DDP -> module, PeftModel -> LoraModel -> PreTrainedModel
        n = getattr(getattr(inner, "config", None), "num_hidden_layers", None)
        if isinstance(n, int):
            return n
        wrapped = getattr(inner, "module", None)
        inner = wrapped if isinstance(wrapped, nn.Module) else getattr(inner, "model", None)
        if not isinstance(inner, nn.Module):
            break
    return len(decoder_layers(model))


class LayerOutputObjective(Objective):
    """Wraps an objective so that `Scores.hidden_states` is the output of decoder layer `layer_id` [B, T_in, H].

    The output is read with a forward hook on the module `...layers.{layer_id}`, as the official RMU code does. For
    every layer but the last this equals Hugging Face's `hidden_states[layer_id + 1]` (`hidden_states[0]` is the
    embedding output); for the last layer, transformers replaces `hidden_states[-1]` with the *final-normed* state,
    so the hook is the only way to get the layer's own output there.
    """

    def __init__(self, inner: Objective, layer_id: int) -> None:
        self.inner = inner
        self.layer_id = layer_id
        self.name = inner.name

    def score(self, model: nn.Module, batch: Batch, hidden_layer: int | None = None) -> Scores:
        layers = decoder_layers(model)
        if self.layer_id not in layers:
            raise ValueError(
                f"RMU layer_id={self.layer_id}, but {type(model).__name__} has decoder layers "
                f"{sorted(layers) or 'none named ...layers.{i}'}."
            )
        captured: list[torch.Tensor] = []

        def hook(module, inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        handle = layers[self.layer_id].register_forward_hook(hook)
        try:
            scores = self.inner.score(model, batch)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"Decoder layer {self.layer_id} did not run in the forward pass.")
        return dataclasses.replace(scores, hidden_states=captured[-1])


def masked_example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean of `values` [B, T] over each example's positions where `mask` [B, T] is True."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def answer_positions(scores: Scores) -> torch.Tensor:
    """[B, T_in] the input positions that hold answer tokens: `mask[:, t]` scores the token at input position t+1."""
    hidden, mask = scores.hidden_states, scores.mask
    positions = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    positions[:, 1 : mask.shape[1] + 1] = mask
    return positions


@dataclass
class RMUConfig(StrategyConfig):
    layer_id: int = field(
        default=7,
        metadata={
            "help": "Decoder layer l whose output is steered (>= 0, below the model's num_hidden_layers); 7: the "
            "published Zephyr-7B run."
        },
    )
    steering_coeff: float = field(
        default=6.5,
        metadata={
            "help": "c, the norm of the target c u (> 0); it must scale with the activations' norm at layer l; 6.5: "
            "the published Zephyr-7B run."
        },
    )
    alpha: float = field(
        default=1200.0,
        metadata={"help": "Weight of the activation-matching retain term (>= 0); 1200: the published Zephyr-7B run."},
    )
    param_layer_ids: list[int] | None = field(
        default=None,
        metadata={
            "help": "Layers whose mlp.down_proj trains (a non-empty list of indices >= 0); None: [l-2, l-1, l] "
            "clipped at 0, the published [5, 6, 7]."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the random direction u; 42: the official code's."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_id < 0:
            raise ValueError(f"RMU needs layer_id >= 0, got {self.layer_id}")
        if self.steering_coeff <= 0:
            raise ValueError(f"RMU needs steering_coeff > 0, got {self.steering_coeff}")
        if self.alpha < 0:
            raise ValueError(f"RMU needs alpha >= 0, got {self.alpha}")
        if self.param_layer_ids is not None and (not self.param_layer_ids or min(self.param_layer_ids) < 0):
            raise ValueError(
                f"RMU param_layer_ids must be a non-empty list of layer indices, got {self.param_layer_ids}"
            )


@register_strategy
class RMU(Strategy):
    """Representation Misdirection for Unlearning.

    Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning" (arXiv:2403.03218),
    Section 5; official code `rmu/unlearn.py` of github.com/centerforaisafety/wmdp.

    With h(x) the output of decoder layer `layer_id` (the module `model.layers[layer_id]`, i.e. Hugging Face's
    `hidden_states[layer_id + 1]`; read with a forward hook, see `LayerOutputObjective`), u a fixed random unit vector
    and c the steering coefficient:

        L_forget = E_forget[ mean_{t in answer tokens} (1/H) || h_t(x) - c u ||^2 ]
        L_retain = E_retain[ mean_{t in real tokens} (1/H) || h_t(x) - h_t^ref(x) ||^2 ]
        L = gamma L_forget + alpha L_retain

    The paper writes squared L2 norms; the official code uses `mse_loss`, which also divides by the hidden size H.
    The published c and alpha are calibrated against that mean, so it is followed here. h^ref is the frozen
    starting model (a frozen copy under full fine-tuning, RMU's setting; under PEFT the adapter-off model, or a
    frozen snapshot of the adapter a model arrives with).

    Positions: the paper pushes every token of the forget documents. On question/answer data the prompt is a shared
    template plus a question that looks like the retain questions, so the forget term here averages over the
    *answer tokens* (the input positions that hold them, EOS included); the retain term, like the official code,
    averages over every real token (attention mask) of the retain example. Each term is a mean over the example's
    positions, then over examples (the official code pools all tokens of the batch, padding included).

    u = r / ||r||, r ~ Uniform[0, 1)^H drawn with `torch.rand` from a generator seeded with `seed` (the official code
    draws `torch.rand` too, so u lies in the positive orthant, not in a uniformly random direction; it draws one u per
    forget corpus, each with its own c, where here there is one forget set and one u).

    Only the MLP down-projections of layers `param_layer_ids` (default [l-2, l-1, l], clipped at 0) train: the
    official `param_ids=[6]` picks the 7th parameter of a Mistral layer, `mlp.down_proj.weight`. Under PEFT, only the
    trainable LoRA parameters of those modules train. `prepare_model` freezes everything else.

    Defaults are the published Zephyr-7B run (`run_rmu_zephyr.ipynb`: `--steering_coeffs 6.5 --alpha 1200 --lr 5e-5`,
    150 batches of 4, with `layer_id=7`, `layer_ids=[5,6,7]`, `param_ids=[6]`). c must scale with the norm of the
    model's activations at layer l (per-coordinate RMS times sqrt(H) is ||h||; the target c u has norm c): a small
    model needs its own c. `gamma` is `forget_weight`; the retain coefficient is `alpha * retain_weight`;
    `retain_loss="none"` drops the retain term (any other value selects RMU's own activation-matching term).
    Logs `forget_mse`, `retain_mse`, `forget_activation_norm` (mean ||h_t|| over forget answer tokens) and
    `forget_cos_u` (mean cosine between h_t and u).
    """

    name = "rmu"
    paper = "https://arxiv.org/abs/2403.03218"
    needs_reference = frozenset({"scores"})
    objectives = ("causal_lm",)
    config_class = RMUConfig

    def __init__(self, config: RMUConfig | None = None, /, **hyperparameters: Any) -> None:
        super().__init__(config, **hyperparameters)
        self._u: dict[int, torch.Tensor] = {}  # the steering vector u, by hidden size

    # ---- the fixed direction and the trained parameters ----

    def steering_vector(self, hidden_size: int) -> torch.Tensor:
        """u: a float32 unit vector [H], the same for the same (seed, H)."""
        if hidden_size not in self._u:
            generator = torch.Generator().manual_seed(self.seed)
            r = torch.rand(hidden_size, generator=generator)
            self._u[hidden_size] = r / r.norm()
        return self._u[hidden_size]

    @property
    def trained_layer_ids(self) -> list[int]:
        if self.param_layer_ids is not None:
            return sorted(set(self.param_layer_ids))
        return list(range(max(0, self.layer_id - 2), self.layer_id + 1))

    def check_layers(self, model: nn.Module) -> None:
        n = num_hidden_layers(model)
        bad = [i for i in [self.layer_id, *self.trained_layer_ids] if i >= n]
        if bad:
            raise ValueError(
                f"RMU layer_id={self.layer_id} / param_layer_ids={self.trained_layer_ids}: the model has "
                f"num_hidden_layers={n} (layers 0..{n - 1}); pick layer_id < {n} (the published 7 is for a 32-layer "
                "Zephyr-7B)."
            )

    def prepare_model(self, model: nn.Module) -> None:
        """Train only the `mlp.down_proj` of the chosen layers (their LoRA parameters under PEFT)."""
        self.check_layers(model)
        layers = decoder_layers(model)
        peft = is_peft_model(model)
        keep: list[nn.Parameter] = []
        for i in self.trained_layer_ids:
            down_proj = getattr(getattr(layers[i], "mlp", None), "down_proj", None)
            if not isinstance(down_proj, nn.Module):
                raise ValueError(f"RMU trains `mlp.down_proj` of each chosen layer; layer {i} has none.")
            for name, param in down_proj.named_parameters():
                if not peft or ("lora_" in name and param.requires_grad):
                    keep.append(param)
        if not keep:
            raise ValueError(
                "RMU found no trainable LoRA parameter in the chosen `mlp.down_proj` modules: add 'down_proj' to the "
                "LoRA target modules (the default 'all-linear' includes it)."
            )
        for param in model.parameters():
            param.requires_grad_(False)
        for param in keep:
            param.requires_grad_(True)

    # ---- the loss ----

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        return self.needs_reference if self.needs_retain(retain_loss_name) else frozenset()

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        scores = LayerOutputObjective(ctx.objective, self.layer_id).score(ctx.model, forget)
        hidden = scores.hidden_states.float()
        positions = answer_positions(scores)
        u = self.steering_vector(hidden.shape[-1]).to(hidden.device)
        mse = ((hidden - self.steering_coeff * u) ** 2).mean(-1)  # [B, T_in]
        loss = masked_example_mean(mse, positions).mean()
        with torch.no_grad():
            norms = hidden.norm(dim=-1)
            metrics = {
                "forget_mse": loss.detach(),
                "forget_activation_norm": norms[positions].mean(),
                "forget_cos_u": ((hidden @ u) / norms.clamp_min(1e-12))[positions].mean(),
            }
        return loss, metrics

    def retain_term(self, ctx: StrategyContext, retain: Batch) -> torch.Tensor:
        objective = LayerOutputObjective(ctx.objective, self.layer_id)
        reference = ctx.require_reference().scores(objective, retain).hidden_states.float()
        hidden = objective.score(ctx.model, retain).hidden_states.float()
        mse = ((hidden - reference) ** 2).mean(-1)
        attended = retain.get("attention_mask")
        attended = torch.ones_like(mse, dtype=torch.bool) if attended is None else attended.bool()
        return masked_example_mean(mse, attended).mean()

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        """L = gamma * L_forget + alpha * retain_weight * L_retain (RMU's own retain term, not the shared one)."""
        forget_term, metrics = self.forget_loss(ctx, forget)
        loss = ctx.forget_weight * forget_term
        metrics = {"forget_loss": forget_term.detach(), **metrics}
        if self.needs_retain(ctx.retain_loss):
            if retain is None:
                raise ValueError("Strategy 'rmu' needs a retain batch (or set retain_loss='none').")
            retain_term = self.retain_term(ctx, retain)
            loss = loss + self.alpha * ctx.retain_weight * retain_term
            metrics["retain_mse"] = retain_term.detach()
            metrics["retain_loss"] = retain_term.detach()
        return loss, metrics
