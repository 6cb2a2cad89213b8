"""Objectives: one per model family, each turning a batch into the quantities strategies need."""

from __future__ import annotations

from torch import nn

from .base import Objective, Scores, token_logprobs_from_logits
from .causal_lm import CausalLMObjective, is_causal_lm
from .classification import ClassificationObjective

OBJECTIVES: dict[str, type[Objective]] = {
    CausalLMObjective.name: CausalLMObjective,
    ClassificationObjective.name: ClassificationObjective,
}


def get_objective(name_or_objective: str | Objective | None, model: nn.Module) -> Objective:
    """The objective named, or the one that fits `model` (causal LM, else classification) when None."""
    if isinstance(name_or_objective, Objective):
        objective = name_or_objective
    elif name_or_objective is None:
        if hasattr(getattr(model, "config", None), "cross_attention_dim"):
            raise ValueError(
                f"{type(model).__name__} is a diffusion UNet: pass objective=DiffusionObjective(text_encoder, "
                "tokenizer, scheduler[, vae]) (from erasus_hf.diffusion), or DiffusionObjective.from_pipeline(pipe)."
            )
        objective = CausalLMObjective() if is_causal_lm(model) else ClassificationObjective()
    elif name_or_objective in OBJECTIVES:
        objective = OBJECTIVES[name_or_objective]()
    else:
        raise ValueError(f"Unknown objective {name_or_objective!r}; valid objectives: {sorted(OBJECTIVES)}")
    objective.validate_model(model)
    return objective


__all__ = [
    "OBJECTIVES",
    "CausalLMObjective",
    "ClassificationObjective",
    "Objective",
    "Scores",
    "get_objective",
    "is_causal_lm",
    "token_logprobs_from_logits",
]
