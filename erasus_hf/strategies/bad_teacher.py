"""Bad teaching: distil the forget set from an incompetent (randomly initialised) teacher, the retain set from the
original model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..objectives import unwrap_model
from ..reference import eval_mode, frozen_copy
from .base import Batch, Strategy, StrategyContext, kl_to_reference
from .config import StrategyConfig
from .registry import register_strategy


def _reset(module: nn.Module) -> bool:
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if reset is None:
        return False
    reset()
    return True


def randomly_initialised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """The model's architecture with fresh random weights, drawn under `seed` (the global RNG is left untouched).

    - a `PreTrainedModel` (under PEFT/DDP wrappers too): `type(model)(config)`, initialised by transformers' own
      `_init_weights` (the architecture's published initialisation, e.g. N(0, initializer_range));
    - any other `nn.Module`: a deep copy whose submodules are all reset with their `reset_parameters()` (PyTorch's
      default initialisation of Linear, Conv, norms, embeddings, ...). A parameter held by a module without
      `reset_parameters` cannot be re-initialised faithfully, so it is an error that names it.
    The copy is in eval mode, frozen, on the model's device and dtype.
    """
    base = unwrap_model(model)
    reference_param = next(base.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(base, PreTrainedModel):
            teacher = type(base)(copy.deepcopy(base.config))
        else:
            teacher = frozen_copy(base)
            not_reset = []
            for name, module in teacher.named_modules():
                own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
                if not _reset(module) and own:
                    not_reset += own
            if not_reset:
                raise ValueError(
                    f"Cannot re-initialise {type(base).__name__} for the incompetent teacher: the parameters "
                    f"{not_reset[:5]} belong to modules without reset_parameters(); give those modules one."
                )
    return teacher.to(device=reference_param.device, dtype=reference_param.dtype).eval().requires_grad_(False)


@dataclass
class BadTeacherConfig(StrategyConfig):
    temperature: float = field(
        default=1.0,
        metadata={"help": "Distillation temperature T (> 0) of both KL terms; the paper's value is 1."},
    )
    teacher_seed: int = field(default=0, metadata={"help": "Seed of the incompetent teacher's random initialisation."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"bad_teacher needs temperature > 0, got {self.temperature}")


@register_strategy
class BadTeacher(Strategy):
    """Bad-teacher knowledge distillation (the incompetent teacher).

    Chundawat, Tarun, Mandal, Kankanhalli 2023, "Can Bad Teaching Induce Forgetting? Unlearning in Deep Networks using
    an Incompetent Teacher", AAAI (arXiv:2205.08096).

    Student = the model trained; competent teacher T_s = the original model (the reference); incompetent teacher
    T_d = the same architecture randomly initialised (`randomly_initialised_copy`, seeded by `teacher_seed`, built
    by `setup` before training). With KL(p || q) = sum_c p_c (log p_c - log q_c) at temperature T:

        L = gamma E_f[ KL(T_d(x) || S(x)) ] + alpha E_r[ KL(T_s(x) || S(x)) ],

    the paper's l_u = 1 / 0 switch between the two teachers written as the two sides of the batch. Published
    defaults: T = 1 (`temperature`), Adam at learning rate 1e-4 for 1 epoch over the forget set and a 30% subset of
    the retain set. The reference code's `F.kl_div(..., reduction="mean")` also divides by the number of classes; this
    KL is per example (batchmean), which only rescales the learning rate. At T != 1 both distributions are softened
    by T and the KL is scaled by T^2 (`kl_to_reference`; the reference code does not scale). `retain_loss` is not
    used (the retain term is the distillation from the original model); gamma and alpha are `forget_weight` and
    `retain_weight`.
    Logs `bad_teacher_forget_kl` and `bad_teacher_retain_kl`.
    """

    name = "bad_teacher"
    paper = "https://arxiv.org/abs/2205.08096"
    needs_reference = frozenset({"scores"})
    objectives = ("classification",)
    token_level = True  # reads the class logits
    config_class = BadTeacherConfig

    def __init__(self, config: BadTeacherConfig | None = None, /, **hyperparameters: Any) -> None:
        super().__init__(config, **hyperparameters)
        self.teacher: nn.Module | None = None  # built by `setup`

    def needs_retain(self, retain_loss_name: str) -> bool:
        return True

    def reference_quantities(self, retain_loss_name: str) -> frozenset[str]:
        return self.needs_reference

    def setup(self, trainer) -> dict[str, float]:
        """Build the incompetent teacher (the trainer calls this before training)."""
        self.teacher = randomly_initialised_copy(trainer.model, self.teacher_seed)
        return {}

    def teardown(self) -> None:
        self.teacher = None

    def compute_loss(self, ctx: StrategyContext, forget: Batch, retain: Batch | None):
        if retain is None:
            raise ValueError("bad_teacher needs a retain batch (distilled from the original model).")
        if self.teacher is None:
            raise RuntimeError("The incompetent teacher is not built; train through UnlearningTrainer.train().")
        with torch.no_grad(), eval_mode(self.teacher):
            incompetent = ctx.objective.score(self.teacher, forget)
        competent = ctx.require_reference().scores(ctx.objective, retain)
        forget_kl = kl_to_reference(ctx.score(forget), incompetent, self.temperature).mean()
        retain_kl = kl_to_reference(ctx.score(retain), competent, self.temperature).mean()
        loss = ctx.forget_weight * forget_kl + ctx.retain_weight * retain_kl
        return loss, {"bad_teacher_forget_kl": forget_kl.detach(), "bad_teacher_retain_kl": retain_kl.detach()}
