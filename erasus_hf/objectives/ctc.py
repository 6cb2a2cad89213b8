"""CTC speech recognisers (Wav2Vec2ForCTC, HubertForCTC, WavLMForCTC, ...): log p(y | x) = -CTC loss.

CTC sums over every frame alignment of the transcript, so it gives a sequence likelihood but no per-token one and no
logits aligned with the target characters (the frame logits are aligned with audio frames). The sequence
log-likelihood is spread evenly over the label positions: `Scores.sequence_logprob` is log p(y | x) and
`Scores.mean_nll` is the CTC loss divided by the target length (transformers' `ctc_loss_reduction="mean"` per
example). Strategies that read per-token log-probabilities or logits declare `token_level = True` and are refused
for this objective (`supports_token_scores = False`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

from ..data.collator import with_passthrough
from .base import Objective, Scores, register_objective, unwrap_model


def is_ctc_model(model: nn.Module) -> bool:
    """Whether `model` (possibly PEFT/DDP-wrapped) is one of transformers' *ForCTC speech recognisers."""
    base = unwrap_model(model)
    return isinstance(base, PreTrainedModel) and type(base).__name__ in set(MODEL_FOR_CTC_MAPPING_NAMES.values())


@register_objective
class CTCObjective(Objective):
    """Scores the transcript `labels` of each clip by -CTC loss (blank = `config.pad_token_id`, frame lengths from
    the model's `_get_feat_extract_output_lengths` of the real input lengths, `zero_infinity` = the config's
    `ctc_zero_infinity`). `Scores.logits` is None; `Scores.hidden_states` are the encoder's (per frame)."""

    name = "ctc"
    peft_task_type = None  # PEFT has no CTC task type; the LoRA wrapper is a plain PeftModel
    supports_token_scores = False
    token_scores_note = (
        "CTC gives log p(y | x) summed over frame alignments: no per-token log-probabilities and no logits aligned "
        "with the target tokens (its logits are per audio frame)"
    )

    collator: AudioCollator  # the side collator (`collator_for`), also for batching rows by hand

    def __init__(self) -> None:
        self.collator = AudioCollator()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_ctc_model(model)

    def validate_model(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        got = type(base).__name__
        if not is_ctc_model(model):
            raise ValueError(
                f"The CTC objective needs a *ForCTC speech recogniser (Wav2Vec2ForCTC, HubertForCTC, ...), got {got}."
            )
        reads_waveform = "input_values" in inspect.signature(type(base).forward).parameters
        if not reads_waveform or not hasattr(base, "_get_feat_extract_output_lengths"):
            raise ValueError(
                f"The CTC objective serves the raw-waveform recognisers of the Wav2Vec2 family (Wav2Vec2, HuBERT, "
                f"WavLM, Data2VecAudio, SEW, UniSpeech, Wav2Vec2Conformer), whose frame lengths follow "
                f"`_get_feat_extract_output_lengths`; {got} is not one of them."
            )
        if base.config.pad_token_id is None:
            raise ValueError(f"{got} has no config.pad_token_id: CTC needs it as the blank token.")

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        missing = [k for k in ("input_values", "labels") if k not in batch]
        if missing:
            raise ValueError(f"A CTC batch needs 'input_values' and 'labels'; missing {missing} in {sorted(batch)}.")
        base = unwrap_model(model)
        blank = base.config.pad_token_id
        inputs = {k: batch[k] for k in ("input_values", "attention_mask") if k in batch}
        outputs = model(**inputs, output_hidden_states=hidden_layer is not None)
        log_probs = nn.functional.log_softmax(outputs.logits, dim=-1, dtype=torch.float32)  # [B, frames, V]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(batch["input_values"], dtype=torch.long)
        input_lengths = base._get_feat_extract_output_lengths(attention_mask.sum(-1)).to(torch.long)
        labels = batch["labels"].to(log_probs.device)
        mask = (labels != -100) & (labels != blank)  # transformers' ForCTCLoss: both are padding
        target_lengths = mask.sum(-1)
        with torch.backends.cudnn.flags(enabled=False):
            nll = nn.functional.ctc_loss(
                log_probs.transpose(0, 1),
                labels.masked_select(mask),
                input_lengths,
                target_lengths,
                blank=blank,
                reduction="none",
                zero_infinity=base.config.ctc_zero_infinity,
            )
        per_label = -nll / target_lengths.clamp_min(1).to(nll.dtype)
        token_logprobs = torch.where(mask, per_label[:, None], torch.zeros((), dtype=nll.dtype, device=nll.device))
        hidden = outputs.hidden_states[hidden_layer] if hidden_layer is not None else None
        return Scores(token_logprobs=token_logprobs, mask=mask, logits=None, hidden_states=hidden)


class AudioCollator:
    """Rows of raw audio `input_values` (1-D float, any length) and `labels`: right-pads the audio with 0 and
    builds `attention_mask` (1 on real samples), pads list labels (CTC transcripts) with -100 and stacks scalar
    labels (a classifier's class ids)."""

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        first = examples[0]
        if "input_values" not in first or "labels" not in first:
            raise ValueError(f"AudioCollator needs rows with 'input_values' and 'labels'; a row has {sorted(first)}.")
        audio = [torch.as_tensor(e["input_values"], dtype=torch.float32).reshape(-1) for e in examples]
        width = max(a.shape[0] for a in audio)
        values = torch.zeros(len(audio), width)
        attention_mask = torch.zeros(len(audio), width, dtype=torch.long)
        for i, a in enumerate(audio):
            values[i, : a.shape[0]] = a
            attention_mask[i, : a.shape[0]] = 1
        if isinstance(first["labels"], (list, tuple)) or torch.as_tensor(first["labels"]).dim() > 0:
            rows = [list(torch.as_tensor(e["labels"]).reshape(-1).tolist()) for e in examples]
            length = max(len(r) for r in rows)
            labels = torch.tensor([r + [-100] * (length - len(r)) for r in rows], dtype=torch.long)
        else:
            labels = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        return with_passthrough(examples, {"input_values": values, "attention_mask": attention_mask, "labels": labels})
