"""Vision-language generation: the likelihood of an answer (or caption) given an image.

One objective for the image-text-to-text models whose text side is a decoder scoring its own input ids:

- LLaVA-style models (`LlavaForConditionalGeneration`, LLaVA-NeXT, ...): image features replace `<image>` placeholder
  tokens in the input ids; logits are aligned with the input ids.
- BLIP captioning (`BlipForConditionalGeneration`): a BERT-style text decoder cross-attends to the image. Hugging Face
  files it under "vision-to-seq" and the issue under "seq2seq", but it has no encoder-side text and no
  `decoder_input_ids`: its logits are aligned with `input_ids` and its own loss shifts them by one exactly as a causal
  LM does (`BlipTextLMHeadModel.forward`), so it belongs here, not with encoder-decoder models.
- Flamingo-style models (`IdeficsForVisionText2Text`, the open reproduction of DeepMind's Flamingo): gated
  cross-attention layers read the image; `image_attention_mask` [B, T, num_images] says which text positions see
  which image; logits are aligned with the input ids.

Scoring is the causal-LM one: `logits[:, :-1]` score `labels[:, 1:]`, -100 masked (prompt, padding and the image
placeholder tokens), so every likelihood strategy (GA, GradDiff, NPO, SimNPO, DPO-style, SCRUB, ...) serves these
models. Encoder-decoder image-to-text models (`VisionEncoderDecoderModel`, Pix2Struct, Florence-2, ...) are not served:
their logits follow `decoder_input_ids`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..data.collator import NOT_MODEL_INPUTS
from .base import Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model
from .vision_language_collator import VisionLanguageCollator

# Module-path components of the vision side (encoder, resampler, projector); LoRA leaves them out by default.
VISION_MODULE_NAMES = frozenset(
    {
        "vision_tower",
        "vision_model",
        "visual",
        "vision_encoder",
        "image_encoder",
        "perceiver_resampler",
        "multi_modal_projector",
        "qformer",
    }
)


def is_vision_language_model(model: nn.Module) -> bool:
    """A decoder-style image-text-to-text model (transformers' image-text-to-text auto mapping, encoder-decoders
    excluded), possibly PEFT/DDP-wrapped."""
    base = unwrap_model(model)
    return (
        isinstance(base, PreTrainedModel)
        and type(base).__name__ in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())
        and not getattr(base.config, "is_encoder_decoder", False)
    )


def language_linear_layers(model: nn.Module) -> list[str]:
    """Full names of the `nn.Linear` modules of the text side: everything but the vision encoder, resampler and
    projector (`VISION_MODULE_NAMES`) and the output head. The default LoRA targets of this objective."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and module is not head
        and not VISION_MODULE_NAMES.intersection(name.split("."))
    ]
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layer outside its vision modules to put LoRA on.")
    return names


@register_objective
class VisionLanguageObjective(Objective):
    """Scores the answer tokens of an image-conditioned decoder: `model(**inputs)` with every batch key but the labels
    and bookkeeping keys (so `pixel_values`, `image_sizes`, `pixel_attention_mask`, `image_attention_mask`, ... reach
    the model as the collator or processor built them), then `logits[:, :-1]` score `labels[:, 1:]`.

    `hidden_states` (on request) are the text decoder's, [B, T, H], aligned with `input_ids` (BLIP returns its vision
    encoder's as `hidden_states`; the text decoder's are read from it directly).

    PEFT: `peft_task_type` is None, a plain `PeftModel` that forwards every keyword unchanged (PEFT's CAUSAL_LM
    wrapper adds keywords such as `inputs_embeds`, which BLIP's forward hands on to its vision encoder, which fails).
    With `use_peft=True` and no `lora_target_modules`, LoRA goes on the language model's linear layers only
    (`language_linear_layers`: attention, MLP and, for BLIP/IDEFICS, the cross-attention), not on the vision encoder,
    resampler or projector, the usual LLaVA LoRA recipe; set `lora_target_modules` or pass a `peft_config` to choose
    otherwise.

    Args:
        processor: the model's processor (or tokenizer), used by the side collator (`VisionLanguageCollator`) for raw
            (image, question, answer) rows. Without it the collator takes pre-tokenized rows only.
        **collator_kwargs: further arguments of `VisionLanguageCollator` (keys, prompt template, pad id, ...).
    """

    name = "vision_language"
    peft_task_type = None
    collator: VisionLanguageCollator  # the side collator of this objective's rows (`collator_for`)

    def __init__(self, processor: Any | None = None, **collator_kwargs: Any) -> None:
        self.collator = VisionLanguageCollator(processor, **collator_kwargs)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_vision_language_model(model)

    def validate_model(self, model: nn.Module) -> None:
        if not is_vision_language_model(model):
            base = unwrap_model(model)
            encoder_decoder = getattr(getattr(base, "config", None), "is_encoder_decoder", False)
            hint = (
                " It is an encoder-decoder model: its logits follow decoder_input_ids, not input_ids."
                if encoder_decoder
                else ""
            )
            raise ValueError(
                f"The vision_language objective needs a decoder-style image-text-to-text model "
                f"(LlavaForConditionalGeneration, BlipForConditionalGeneration, IdeficsForVisionText2Text, or another "
                f"class of transformers' image-text-to-text mapping), got {type(base).__name__}.{hint}"
            )

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        if "input_ids" not in batch or "labels" not in batch:
            raise ValueError(
                f"A vision_language batch needs input_ids and labels (and the image inputs); got {sorted(batch)}."
            )
        inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}
        base = unwrap_model(model)
        if type(base).__name__ == "BlipForConditionalGeneration":
            # BLIP's text decoder starts from its [DEC] token: `generate` overwrites the processor's [CLS] with it
            # (as BLIP's training code did), so the caption is scored as the model generates it.
            inputs["input_ids"] = inputs["input_ids"].clone()
            inputs["input_ids"][:, 0] = base.config.text_config.bos_token_id
        text_decoder = getattr(base, "text_decoder", None)  # BLIP: hidden_states are the vision encoder's
        captured: list[Any] = []
        handle = None
        if hidden_layer is not None:
            inputs["output_hidden_states"] = True
            if text_decoder is not None:
                handle = text_decoder.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            outputs = model(**inputs, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
        if outputs.logits.shape[:2] != batch["input_ids"].shape:
            raise ValueError(
                f"{type(base).__name__} returned logits {tuple(outputs.logits.shape)} not aligned with input_ids "
                f"{tuple(batch['input_ids'].shape)}: the vision_language objective needs logits at every input id."
            )
        logits = outputs.logits[:, :-1]
        logprobs, mask = token_logprobs_from_logits(logits, batch["labels"][:, 1:])
        hidden = None
        if hidden_layer is not None:
            hidden_states = captured[-1].hidden_states if captured else outputs.hidden_states
            if hidden_states is None:
                raise ValueError(f"{type(base).__name__} does not return the text decoder's hidden states.")
            hidden = hidden_states[hidden_layer]
        return Scores(token_logprobs=logprobs, mask=mask, logits=logits, hidden_states=hidden)

    def prepare_peft(self, model: nn.Module, args: Any, peft_config: Any = None) -> tuple[nn.Module, str | None, bool]:
        """The trainer's LoRA wrapping, with the language model's linear layers as the default targets."""
        from peft import LoraConfig

        from ..peft_utils import is_peft_model, prepare_peft

        if peft_config is None and args.use_peft and not args.lora_target_modules and not is_peft_model(model):
            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=language_linear_layers(model),
                task_type=self.peft_task_type,
            )
        return prepare_peft(model, args, peft_config, task_type=self.peft_task_type)
