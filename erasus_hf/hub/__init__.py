"""Sharing unlearned models on the Hugging Face Hub: the model card (`card`) and the upload."""

from .card import build_model_card, forget_fingerprint, training_arguments, write_model_card

__all__ = ["build_model_card", "forget_fingerprint", "training_arguments", "write_model_card"]
