"""Differential privacy from the start: DP-SGD fine-tuning of the model that will later receive deletion requests.

`DPTrainer` (a `transformers.Trainer`) fine-tunes a causal LM, fully or through a LoRA adapter, with Opacus' DP-SGD:
per-example gradients clipped to `max_grad_norm`, Gaussian noise whose scale Opacus' accountant sets for a target
(epsilon, delta) over the planned steps (`PrivacyEngine.make_private_with_epsilon`), Poisson-sampled batches. The
model is never wrapped: Opacus' non-wrapping mode (`wrap_model=False`, a `GradSampleHooks` controller) attaches its
per-sample-gradient hooks to the Hugging Face model itself, so the Trainer, accelerate and PEFT see the model they
know. `DPConfig` holds the options (TRL style: `TrainingArguments` plus the privacy fields), `DPReport` what the
accountant certifies at the end (the card's block, `privacy.json` beside the weights).

Opacus is an optional dependency (``pip install opacus``, or the ``privacy`` extra): it is imported when a trainer is
built, never by ``import erasus_hf``.
"""

from .config import ACCOUNTANTS, DPConfig
from .report import PRIVACY_FILE, DPReport, require_opacus
from .trainer import DPTrainer

__all__ = ["ACCOUNTANTS", "PRIVACY_FILE", "DPConfig", "DPReport", "DPTrainer", "require_opacus"]
