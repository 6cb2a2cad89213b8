"""Objectives: one per model family, each turning a batch into the quantities strategies need.

Auto-detection (`get_objective(None, model)`) tries the registered objectives in the order imported below (the
specific families first) and falls back to classification, which serves any module that returns class logits.
"""

from __future__ import annotations

from torch import nn

from .base import OBJECTIVES, Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model
from .causal_lm import CausalLMObjective, is_causal_lm
from .classification import ClassificationObjective
from .contrastive import ContrastiveCollator, ContrastiveObjective
from .ctc import AudioCollator, CTCObjective, is_ctc_model
from .seq2seq import Seq2SeqObjective, Seq2SeqQACollator, SpeechSeq2SeqCollator, is_seq2seq_lm
from .vision_language import VisionLanguageCollator, VisionLanguageObjective, is_vision_language_model

register_objective(ClassificationObjective)  # last: the fallback


def get_objective(name_or_objective: str | Objective | None, model: nn.Module) -> Objective:
    """The objective named, or the one whose family `model` belongs to when None (classification as fallback)."""
    if isinstance(name_or_objective, Objective):
        objective = name_or_objective
    elif name_or_objective is None:
        if hasattr(getattr(model, "config", None), "cross_attention_dim"):
            raise ValueError(
                f"{type(model).__name__} is a diffusion UNet: pass objective=DiffusionObjective(text_encoder, "
                "tokenizer, scheduler[, vae]) (from erasus_hf.diffusion), or DiffusionObjective.from_pipeline(pipe)."
            )
        detected = next((cls for cls in OBJECTIVES.values() if cls.matches(model)), ClassificationObjective)
        objective = detected()
    else:
        objective = OBJECTIVES.lookup(name_or_objective)()
    objective.validate_model(model)
    return objective


__all__ = [
    "OBJECTIVES",
    "AudioCollator",
    "CTCObjective",
    "CausalLMObjective",
    "ClassificationObjective",
    "ContrastiveCollator",
    "ContrastiveObjective",
    "Objective",
    "Scores",
    "Seq2SeqObjective",
    "Seq2SeqQACollator",
    "SpeechSeq2SeqCollator",
    "VisionLanguageCollator",
    "VisionLanguageObjective",
    "get_objective",
    "is_causal_lm",
    "is_ctc_model",
    "is_seq2seq_lm",
    "register_objective",
    "token_logprobs_from_logits",
    "is_vision_language_model",
    "unwrap_model",
]
