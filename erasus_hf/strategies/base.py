"""The strategy contract: a published unlearning loss written against objectives and a reference."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..objectives import Objective, Scores
from ..reference import Reference
from .config import HyperparameterError, StrategyConfig, config_from_signature

Batch = dict[str, torch.Tensor]
_BASE_DECLARATION = object()  # `PerInstance` without a class value: the class reads the base Strategy's


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


class PerInstance:
    """A strategy declaration (`token_level`, `objectives`, ...) that an instance computes from its hyperparameters
    or parts, where the class still has to answer: `compute(instance)` on an instance, `class_value` on the class.

    Listings built from classes read the class's answer (`check_token_scores`'s strategies that can serve an
    objective, the contract test). A class answers for what `get_strategy(name)` builds, its default hyperparameters
    (PDU: `token_level` True, its default forget term reads logits); without `class_value` it answers with the base
    `Strategy`'s declaration (a composition: what suitable parts can make of it). Read-only: it follows from them.
    """

    def __init__(self, compute: Callable[[Any], Any], class_value: Any = _BASE_DECLARATION) -> None:
        self.compute = compute
        self.class_value = class_value
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is not None:
            return self.compute(instance)
        return vars(Strategy)[self.name] if self.class_value is _BASE_DECLARATION else self.class_value

    def __set__(self, instance: Any, value: Any) -> None:
        raise AttributeError(f"{type(instance).__name__}.{self.name} follows from its hyperparameters; it is not set.")


class Strategy:
    """Base class. Subclasses set the class attributes, declare their hyperparameters as the fields of a
    `StrategyConfig` subclass (`config_class`, the published defaults), and implement `forget_loss`; the retain
    term is shared. The declarations a class makes (an instance may compute its own with `PerInstance`):

    - `needs_reference`: which reference quantities the forget term uses: "sequence_logprob" (cacheable) or
      "scores" (logits / hidden states, needs a model). Empty when the method is reference-free.
    - `uses_retain`: whether the method has a retain term (alpha * L_retain).
    - `objectives`: the model families (objective names) the method serves.
    - `token_level`: whether the forget loss reads per-token log-probs or the logits of the target tokens, not only
      sequence log-likelihoods; objectives without them (CTC: `supports_token_scores = False`) cannot serve it.
    - `stateful`: whether the strategy keeps state between optimizer steps (`state_dict`) that a resumed run must
      get back.
    - `one_shot`: whether `train()` applies an edit (`apply`) instead of running the training loop (task vectors,
      SSD, UCE, ...).
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
    token_level: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    one_shot: ClassVar[bool] = False

    config_class: ClassVar[type[StrategyConfig]] = StrategyConfig
    # an instance's own, set by `__init__`; the empty default serves a user's strategy whose `__init__` takes no
    # hyperparameters and does not call `Strategy.__init__`
    config: StrategyConfig = StrategyConfig()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Compatibility: a strategy that declares no `config_class` and takes its hyperparameters as `__init__`
        keyword arguments (a user's own, written before configs) gets a config made from that signature, so its
        values are typed and checked the same way; its `__init__` then receives the converted values."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or "config_class" in cls.__dict__:
            return
        config_class = config_from_signature(cls, init)
        if not config_class.field_names():  # `__init__(self)` or the config signature: the inherited config holds
            return
        cls.config_class = config_class
        signature = inspect.signature(init)

        @functools.wraps(init)
        def typed_init(self, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            config = self._build_config(config_class, dict(list(bound.arguments.items())[1:]))
            init(self, **config.to_dict())
            self.config = config  # after `init`: the outermost class's config, whatever the parents' set

        cls.__init__ = typed_init

    def __init__(self, config: StrategyConfig | None = None, /, **hyperparameters: Any) -> None:
        """Build from a config, or from hyperparameters by name (`NPO(beta=0.2)`, `get_strategy("npo", beta=0.2)`):
        converted to their declared types and checked (`StrategyConfig`), then set as attributes (`self.beta`).
        Subclasses with derived state override `__init__` with this signature, call this one first and read
        `self.<hyperparameter>`."""
        if self.config_class.from_signature:
            # a compatible `__init__` (see `__init_subclass__`) calling up: its wrapper converted the values and sets
            # the config when that `__init__` returns
            for name, value in hyperparameters.items():
                setattr(self, name, value)
            return
        if config is None:
            config = self._build_config(self.config_class, hyperparameters)
        elif hyperparameters:
            raise ValueError(f"Strategy {self.name!r}: pass a config or hyperparameters by name, not both.")
        elif not isinstance(config, self.config_class):
            raise TypeError(
                f"Strategy {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}."
            )
        self.config = config
        for name, value in config.to_dict().items():
            setattr(self, name, value)

    def _build_config(self, config_class: type[StrategyConfig], hyperparameters: dict[str, Any]) -> StrategyConfig:
        """`config_class(**hyperparameters)`, a value of the wrong type refused with the strategy's name."""
        try:
            return config_class(**hyperparameters)
        except HyperparameterError as err:
            raise ValueError(f"Strategy {self.name!r}: {err}") from None

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

    def setup(self, trainer) -> dict[str, float]:
        """Called by `UnlearningTrainer.train()` before the training loop, with the trainer (its model, rows and
        arguments): build what the loss needs from the forget set (SalUn's saliency mask, a bad teacher, l1_sparse's
        schedule). Returns metrics to log. Default: nothing to build."""
        return {}

    def teardown(self) -> None:
        """Called when the training loop ends (also on an error): undo what `setup` installed (gradient hooks)."""

    def apply(self, trainer) -> dict[str, float]:
        """The edit of a `one_shot` strategy, run by `train()` instead of the training loop, on `trainer.model`;
        returns metrics to log. A one-shot edit that needs a fine-tuning pass asks the trainer for it
        (`trainer.finetune_on_forget`)."""
        raise NotImplementedError(f"Strategy {self.name!r} is not one-shot; it has no apply().")

    @classmethod
    def builds_state_before_training(cls) -> bool:
        """Whether the strategy overrides `setup` (state built from the forget set before the loop)."""
        return cls.setup is not Strategy.setup

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
        """The fields of `config_class`: the method's hyperparameters."""
        return cls.config_class.field_names()

    @property
    def hyperparameters(self) -> dict[str, object]:
        return self.config.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"{type(self).__name__}({args})"


def _log_softmax32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """float32 log-softmax over the vocabulary, `log_softmax(logits.float() / temperature)` value for value. Without a
    temperature the cast happens inside the kernel (`dtype=`), so bf16 logits get no float32 copy of their own next
    to the float32 result; a temperature divides in float32, as before."""
    if temperature != 1.0:
        return torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def kl_to_reference(policy: Scores, reference: Scores, temperature: float = 1.0) -> torch.Tensor:
    """[B] KL(pi_ref || pi_theta) per token, averaged over each example's scored tokens.

    KL = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)), computed from the logits at the answer positions only. With
    a temperature T both distributions are softened by T and the KL is scaled by T^2 (distillation, as in SCRUB).
    """
    mask = policy.mask
    log_p = _log_softmax32(policy.logits[mask], temperature)
    log_q = _log_softmax32(reference.logits[mask], temperature)
    per_token = torch.zeros(mask.shape, dtype=log_p.dtype, device=log_p.device)
    per_token[mask] = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2
    return per_token.sum(-1) / mask.sum(-1).clamp_min(1)


def kl_over_all_positions(policy: Scores, reference: Scores) -> torch.Tensor:
    """KL(pi_ref || pi_theta) summed over every position of the batch that has logits and divided by their number
    (B x T): the retain KL of TOFU (`dataloader.py`, forget_loss "KL") and open-unlearning (`compute_kl_divergence`),
    `kl_div(log_softmax(policy), log_softmax(ref), reduction="batchmean", log_target=True)` on logits flattened to
    [B x T, V]. Prompt and padding positions count; labels and attention mask are not read. A causal LM's scores
    hold the logits of every input position but the last (which predicts past the sequence), so T = length - 1."""
    log_p = _log_softmax32(policy.logits).flatten(0, -2)
    log_q = _log_softmax32(reference.logits).flatten(0, -2)
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
