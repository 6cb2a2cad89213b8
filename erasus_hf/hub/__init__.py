"""Sharing unlearned models on the Hugging Face Hub: the model card (`card`), the upload (`push`, importable on its
own: it needs only the Hub libraries) and the trainer's Hub methods (`sharing.HubMixin`)."""

from .card import build_model_card, forget_fingerprint, training_arguments, write_model_card

__all__ = ["build_model_card", "forget_fingerprint", "training_arguments", "write_model_card"]
