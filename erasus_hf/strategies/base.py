"""The strategy contract: a published unlearning loss written against objectives and a reference."""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..objectives import Objective, Scores
from ..reference import Reference

Batch = dict[str, torch.Tensor]


@dataclass
class StrategyContext:
    """Everything a strategy may use in one step: the model being trained, how to score it, the frozen reference,
    the weights of the forget (gamma) and retain (alpha) terms and the retain term's options (`retain_loss`,
    `retain_kl_positions`, see `UnlearningConfig`), and where training is (optimizer step, epoch;
    `training` is False under `evaluate()`, where stateful strategies must not update their state)."""

    model: nn.Module
    objective: Objective
    reference: Reference | None
    forget_weight: float = 1.0
    retain_weight: float = 1.0
    retain_loss: str = "nll"
    retain_kl_positions: str = "answer"
    global_step: int = 0
    epoch: float = 0.0
    training: bool = True
    _scores: dict = field(default_factory=dict, repr=False)

    def score(self, batch: Batch, hidden_layer: int | None = None) -> Scores:
        """Score `batch` with the model being trained; within one step each (batch, layer) is scored once, so
        strategies combined in an ensemble share their forward passes."""
        key = (id(batch), hidden_layer)
        if key not in self._scores:
            self._scores[key] = self.objective.score(self.model, batch, hidden_layer=hidden_layer)
        return self._scores[key]

    def require_reference(self) -> Reference:
        if self.reference is None:
            raise ValueError("This strategy needs a reference model, but none was set up.")
        return self.reference


class Strategy:
    """Base class. Subclasses set the class attributes, take their hyperparameters as keyword arguments of
    `__init__` (the published defaults), and implement `forget_loss`; the retain term is shared.

    - `needs_reference`: which reference quantities the forget term uses: "sequence_logprob" (cacheable) or
      "scores" (logits / hidden states, needs a model). Empty when the method is reference-free.
    - `uses_retain`: whether the method has a retain term (alpha * L_retain).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    needs_reference: ClassVar[frozenset[str]] = frozenset()
    uses_retain: ClassVar[bool] = True
    objectives: ClassVar[tuple[str, ...]] = (
        "causal_lm",
        "classification",
        "seq2seq",
        "ctc",
        "contrastive",
        "vision_language",
    )
    # whether the forget loss reads per-token log-probs or the logits of the target tokens, not only sequence
    # log-likelihoods; objectives without them (CTC: `supports_token_scores = False`) cannot serve such a strategy
    token_level: ClassVar[bool] = False
    # whether the strategy keeps state between optimizer steps (`state_dict`) that a resumed run must get back
    stateful: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every strategy's `__init__` checks its hyperparameters against their annotations before it runs (see
        `typed_hyperparameters`): one place for every strategy, user-defined ones included."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not hasattr(init, "__wrapped__"):
            cls.__init__ = _typed_init(init)

    def prepare_model(self, model: nn.Module) -> None:
        """Called once before the optimizer is built; a method that trains only some parameters (e.g. RMU's chosen
        layers) sets `requires_grad` here. The default trains what the caller left trainable."""

    def state_dict(self) -> dict[str, Any]:
        """What the strategy keeps between optimizer steps (`stateful` strategies: PDU's dual variable, SalUn's
        mask), as JSON values or tensors. `UnlearningTrainer` stores it in every checkpoint and gives it back to
        `load_state_dict` on `train(resume_from_checkpoint=...)`, so a resumed run continues the same run. Empty for
        strategies whose state follows from their hyperparameters, the step and the epoch (SCRUB's phase, RMU's
        direction, l1_sparse's schedule): the Trainer restores those."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (called before training resumes)."""
        if state:
            raise ValueError(f"Strategy {self.name!r} keeps no state, but was given {sorted(state)}.")

    def alternate_answers(self, forget, seed: int) -> list[str] | None:
        """DPO-style methods return one alternate answer per forget row (the preferred y_alt); others None."""
        return None

    def forget_loss(self, ctx: StrategyContext, forget: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forget term (before gamma) and diagnostics to log."""
        raise NotImplementedError

    def compute_loss(
        self, ctx: StrategyContext, forget: Batch, retain: Batch | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = gamma * L_forget + alpha * L_retain, every term a mean over examples."""
        forget_term, metrics = self.forget_loss(ctx, forget)
        loss = ctx.forget_weight * forget_term
        metrics = {"forget_loss": forget_term.detach(), **metrics}
        if self.uses_retain and ctx.retain_loss != "none":
            if retain is None:
                raise ValueError(f"Strategy {self.name!r} with retain_loss={ctx.retain_loss!r} needs a retain batch.")
            retain_term = retain_loss(ctx, retain)
            loss = loss + ctx.retain_weight * retain_term
            metrics["retain_loss"] = retain_term.detach()
        return loss, metrics

    def needs_retain(self, retain_loss_name: str) -> bool:
        return self.uses_retain and retain_loss_name != "none"

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        """Reference quantities the whole loss needs, retain term included (KL needs reference logits)."""
        needs = set(self.needs_reference)
        if self.needs_retain(retain_loss_name) and retain_loss_name == "kl":
            needs.add("scores")
        return frozenset(needs)

    def needs_token_scores(self, retain_loss_name: str) -> bool:
        """Whether the loss reads per-token log-probs or logits: a token-level forget term or a KL retain term."""
        return self.token_level or (self.needs_retain(retain_loss_name) and retain_loss_name == "kl")

    @classmethod
    def hyperparameter_names(cls) -> list[str]:
        """The keyword arguments of `__init__`: the method's hyperparameters."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]

    @property
    def hyperparameters(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.hyperparameter_names()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args})"


class _Unconvertible(ValueError):
    """A value that does not fit an annotation (internal: turned into the message naming the hyperparameter)."""


BOOL_STRINGS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
SCALARS = (bool, int, float, str)


def _convert(value: Any, annotation: Any) -> Any:
    """`value` as the annotated type: strings (from the command line or a YAML recipe, which reads `1e-3` as a
    string) are converted once, numbers must be finite, an int is not a bool; annotations other than scalars, their
    lists and dicts, and their unions with None are not checked (their `__init__` validates them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in options:
            return value
        for option in options:
            try:
                return _convert(value, option)
            except _Unconvertible:
                continue
        raise _Unconvertible(" or ".join(_describe(o) for o in options))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_STRINGS:
            return BOOL_STRINGS[value.strip().lower()]
        raise _Unconvertible("a bool (true or false)")
    if annotation is int:
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise _Unconvertible("an int") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Unconvertible("an int")
    if annotation is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise _Unconvertible("a finite number") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise _Unconvertible("a finite number")
        return float(number)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Unconvertible("a string")
    if origin in (list, tuple, collections.abc.Sequence) and len(args) == 1 and args[0] in SCALARS:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise _Unconvertible(_describe(annotation))
        return [_convert(v, args[0]) for v in value]
    if origin in (dict, collections.abc.Mapping) and len(args) == 2 and all(a in SCALARS for a in args):
        if not isinstance(value, collections.abc.Mapping):
            raise _Unconvertible(_describe(annotation))
        return {_convert(k, args[0]): _convert(v, args[1]) for k, v in value.items()}
    return value


def _describe(annotation: Any) -> str:
    names = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}
    if annotation in names:
        return names[annotation]
    if typing.get_origin(annotation) is not None:  # list[int], dict[str, str]
        return f"a {str(annotation).replace('typing.', '')}"
    return f"a {getattr(annotation, '__name__', annotation)}"


def typed_hyperparameters(owner: str, init: Callable, arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` of `init` converted to their annotated types (`_convert`); a value that does not fit raises a
    ValueError naming the strategy, the hyperparameter, the value and the type it must have."""
    hints = _hints(init)
    checked = dict(arguments)
    for name, value in arguments.items():
        if name not in hints:
            continue
        try:
            checked[name] = _convert(value, hints[name])
        except _Unconvertible as err:
            raise ValueError(
                f"Strategy {owner!r}: hyperparameter {name!r} must be {err}, got {value!r} ({type(value).__name__}). "
                f"Fix strategy_kwargs={{{name!r}: ...}}."
            ) from None
    return checked


@functools.cache
def _hints(init: Callable) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that does not resolve: leave those values to the strategy
        return {}
    hints.pop("return", None)
    return hints


def _typed_init(init: Callable) -> Callable:
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked_init(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        values = {
            name: value
            for name, value in list(bound.arguments.items())[1:]
            if signature.parameters[name].kind
            in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }
        bound.arguments.update(typed_hyperparameters(getattr(self, "name", type(self).__name__), init, values))
        init(*bound.args, **bound.kwargs)

    return checked_init


def check_token_scores(strategy: Strategy, objective: Objective, retain_loss_name: str) -> None:
    """Refuse a strategy that reads per-token log-probs or logits for an objective whose scores have none (CTC gives a
    sequence likelihood only), naming the strategies that can serve it."""
    if getattr(objective, "supports_token_scores", True) or not strategy.needs_token_scores(retain_loss_name):
        return
    from .registry import STRATEGIES

    what = "its loss reads" if strategy.token_level else f"retain_loss={retain_loss_name!r} (a KL) reads"
    usable = sorted(n for n, c in STRATEGIES.items() if objective.name in c.objectives and not c.token_level)
    raise ValueError(
        f"Strategy {strategy.name!r} cannot serve the {objective.name!r} objective: {what} per-token log-probs or "
        f"logits of the target tokens, and {getattr(objective, 'token_scores_note', 'this objective has none')}. "
        f"Strategies that need only sequence log-likelihoods (with retain_loss 'nll' or 'none'): {', '.join(usable)}."
    )


def kl_to_reference(policy: Scores, reference: Scores, temperature: float = 1.0) -> torch.Tensor:
    """[B] KL(pi_ref || pi_theta) per token, averaged over each example's scored tokens.

    KL = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), computed from the logits at the answer positions only. With
    a temperature T both distributions are softened by T and the KL is scaled by T^2 (distillation, as in SCRUB).
    """
    mask = policy.mask
    log_p = torch.log_softmax(policy.logits[mask].float() / temperature, dim=-1)
    log_q = torch.log_softmax(reference.logits[mask].float() / temperature, dim=-1)
    per_token = torch.zeros(mask.shape, dtype=log_p.dtype, device=log_p.device)
    per_token[mask] = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1)


def kl_over_all_positions(policy: Scores, reference: Scores) -> torch.Tensor:
    """KL(pi_ref || pi_theta) summed over every position of the batch that has logits and divided by their number
    (B x T): the retain KL of TOFU (`dataloader.py`, forget_loss "KL") and open-unlearning (`compute_kl_divergence`),
    `kl_div(log_softmax(policy), log_softmax(ref), reduction="batchmean", log_target=True)` on logits flattened to
    [B x T, V]. Prompt and padding positions count; labels and attention mask are not read. A causal LM's scores
    hold the logits of every input position but the last (which predicts past the sequence), so T = length - 1."""
    log_p = torch.log_softmax(policy.logits.float(), dim=-1).flatten(0, -2)
    log_q = torch.log_softmax(reference.logits.float(), dim=-1).flatten(0, -2)
    return (log_q.exp() * (log_q - log_p)).sum() / log_p.shape[0]


def retain_loss(ctx: StrategyContext, retain: Batch) -> torch.Tensor:
    """L_retain: NLL of the retain answers, or KL(pi_ref || pi_theta) on them.

    `retain_kl_positions="answer"` (default): the KL of each answer token, averaged per example and then over
    examples (every term a mean over examples, so gradient accumulation stays exact). `"all"`: TOFU's and
    open-unlearning's reference behaviour, one mean over every position of the padded batch (`kl_over_all_positions`;
    it depends on how far the batch is padded, so accumulation 4 x 2 is not 1 x 8 there).
    """
    if ctx.retain_loss == "nll":
        return ctx.score(retain).mean_nll.mean()
    if ctx.retain_loss == "kl":
        reference = ctx.require_reference().scores(ctx.objective, retain)  # before the policy pass, see reference.py
        if ctx.retain_kl_positions == "answer":
            return kl_to_reference(ctx.score(retain), reference).mean()
        if ctx.retain_kl_positions == "all":
            return kl_over_all_positions(ctx.score(retain), reference)
        raise ValueError(f"Unknown retain_kl_positions {ctx.retain_kl_positions!r}; valid: 'answer', 'all'")
    raise ValueError(f"Unknown retain_loss {ctx.retain_loss!r}; valid: 'nll', 'kl', 'none'")
