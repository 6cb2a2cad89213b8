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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..data.collator import NOT_MODEL_INPUTS, PASSTHROUGH_KEYS, with_passthrough
from ..data.formatting import format_completion
from .base import Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model

# Keys of a batch that are not model inputs (the labels and the trainer's bookkeeping).

# Per-row tensors indexed by text position ([T, ...]): padded along the text, not stacked as image data.
TEXT_ALIGNED_KEYS = ("image_attention_mask", "cross_attention_mask", "token_type_ids", "mm_token_type_ids")

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

    def collator_for(self, processing_class: Any | None, max_length: int) -> Any:
        """The collator this objective was built with."""
        return self.collator

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


@dataclass
class Encoded:
    """One row, ready to pad: ids and labels, the text-aligned inputs ([T, ...]) and the other model inputs (per-row
    arrays to stack, or the processor's outputs to concatenate when `batched`)."""

    input_ids: list[int]
    labels: list[int]
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    batched: bool = False


class VisionLanguageCollator:
    """Side collator for image-conditioned answers (or captions); labels mask the prompt, the padding and the image
    placeholder tokens with -100. Text is padded on the right (no `position_ids` are built, so models with their own
    position scheme, e.g. multimodal RoPE, compute them as usual).

    Row layouts, checked in this order:

    - pre-tokenized: `input_ids` (+ optional `labels`, default `input_ids`), plus the image inputs as arrays
      (`pixel_values`, `image_sizes`, `image_attention_mask`, ...);
    - prompt/answer ids: `prompt_ids` and `answer_ids` (+ the image inputs): `input_ids = prompt_ids + answer_ids`,
      the prompt masked;
    - raw: `image` (a PIL image or a list of them), `question` (optional: captioning has none) and `answer`, run
      through `processor(images=[image], text=[prompt])`. The prompt is `prompt_template` formatted with `{image}`
      (the processor's image placeholder, e.g. LLaVA's "<image>"; "" for processors that place images themselves,
      BLIP and IDEFICS) and `{question}`; by default the processor's chat template (a user turn with the image and
      the question) when it has one, else "{image}{question}". The answer follows as " " + answer, then EOS unless
      the tokenizer already ended the text with its EOS/SEP. The labels mask the longest common prefix of the prompt's
      and the full text's ids (the prompt, its image tokens included).

    The arrays of pre-tokenized rows are stacked across the batch; the processor's outputs are concatenated along
    their first dim, as processors batch them (a batch dim of 1 for most; the flattened patches for Qwen2-VL-style
    processors). Either way they must agree in shape across rows (e.g. an image processor with a fixed size).
    `TEXT_ALIGNED_KEYS` ([T, ...] per row) are padded with 0 along the text. `index`/`slot` pass through;
    a string `alternate` (DPO-style strategies) becomes a nested batch of the same rows with that answer (slot 1).

    Args:
        processor: a processor (or tokenizer); needed for raw rows, and gives the pad and image-token ids.
        pad_token_id: the id padding `input_ids` (default: the tokenizer's pad, else its EOS; 0 without a processor:
            padded positions are masked out of attention and labels, the id only must not be the image placeholder).
        image_token_id: the image placeholder id, masked out of the labels (default: the processor's, if any).
        max_length: truncate `input_ids` on the right to this many tokens (None: no truncation).
    """

    def __init__(
        self,
        processor: Any | None = None,
        *,
        pad_token_id: int | None = None,
        image_token_id: int | None = None,
        image_key: str = "image",
        question_key: str = "question",
        answer_key: str = "answer",
        prompt_template: str | None = None,
        max_length: int | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if pad_token_id is None and self.tokenizer is not None:
            pad_token_id = self.tokenizer.pad_token_id
            if pad_token_id is None:
                pad_token_id = self.tokenizer.eos_token_id
            if pad_token_id is None:
                raise ValueError("The tokenizer has neither a pad token nor an EOS token; pass pad_token_id.")
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        if image_token_id is None and processor is not None:
            image_token_id = getattr(processor, "image_token_id", None)
        self.image_token_id = image_token_id
        if self.image_token_id is not None and self.pad_token_id == self.image_token_id:
            raise ValueError(f"pad_token_id {self.pad_token_id} is the image placeholder id; pass another one.")
        self.image_key = image_key
        self.question_key = question_key
        self.answer_key = answer_key
        self.prompt_template = prompt_template
        self.max_length = max_length

    # ---- one row ----

    def encode(self, row: dict[str, Any]) -> Encoded:
        """One row -> its `input_ids`, `labels` and other model inputs."""
        if "input_ids" in row:
            input_ids = [int(t) for t in row["input_ids"]]
            labels = [int(t) for t in row["labels"]] if row.get("labels") is not None else list(input_ids)
            encoded = Encoded(input_ids, labels, **self._arrays(row, ("input_ids", "labels", "attention_mask")))
        elif "prompt_ids" in row and "answer_ids" in row:
            prompt, answer = [int(t) for t in row["prompt_ids"]], [int(t) for t in row["answer_ids"]]
            arrays = self._arrays(row, ("prompt_ids", "answer_ids", "attention_mask"))
            encoded = Encoded(prompt + answer, [-100] * len(prompt) + answer, **arrays)
        elif self.answer_key in row:
            encoded = self._process(row)
        else:
            raise ValueError(
                f"Cannot collate a vision_language row with keys {sorted(row)}: expected input_ids (+ labels) or "
                f"prompt_ids + answer_ids with the image inputs (pixel_values, ...), or raw {self.image_key!r}, "
                f"{self.question_key!r}, {self.answer_key!r} with a processor."
            )
        if len(encoded.input_ids) != len(encoded.labels):
            raise ValueError(
                f"input_ids ({len(encoded.input_ids)}) and labels ({len(encoded.labels)}) differ in length."
            )
        if self.image_token_id is not None:
            encoded.labels = [
                -100 if t == self.image_token_id else y for t, y in zip(encoded.input_ids, encoded.labels)
            ]
        if self.max_length is not None:
            encoded.input_ids, encoded.labels = encoded.input_ids[: self.max_length], encoded.labels[: self.max_length]
            encoded.text = {k: v[: self.max_length] for k, v in encoded.text.items()}
        return encoded

    def _arrays(self, row: dict[str, Any], skip: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
        """A pre-tokenized row's model inputs, split into text-aligned ones and per-row arrays."""
        ignore = {*skip, *NOT_MODEL_INPUTS, self.image_key, self.question_key, self.answer_key}
        text, arrays = {}, {}
        for key, value in row.items():
            if key in ignore or value is None:
                continue
            try:
                tensor = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"Column {key!r} of a pre-tokenized row is not an array ({type(value).__name__}); such rows must "
                    "hold only model inputs (input_ids/labels or prompt_ids/answer_ids and the image inputs)."
                ) from error
            (text if key in TEXT_ALIGNED_KEYS else arrays)[key] = tensor
        return {"text": text, "arrays": arrays}

    def prompt(self, question: str | None) -> str:
        """The text before the answer (image placeholder included)."""
        question = question or ""
        image = getattr(self.processor, "image_token", None) or ""  # None for BLIP and IDEFICS: they place images
        if self.prompt_template is not None:
            return self.prompt_template.format(image=image, question=question)
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"}] + ([{"type": "text", "text": question}] if question else [])
            return self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return f"{image}{question}"

    def _process(self, row: dict[str, Any]) -> Encoded:
        if self.processor is None:
            raise ValueError(
                f"Raw rows ({self.image_key!r}, {self.answer_key!r}) need the model's processor: pass "
                "objective=VisionLanguageObjective(processor) or data_collator=VisionLanguageCollator(processor)."
            )
        if row.get(self.image_key) is None:
            raise ValueError(f"The row has no image under {self.image_key!r}; keys are {sorted(row)}.")
        image = row[self.image_key]
        images = [list(image) if isinstance(image, (list, tuple)) else image]
        prompt = self.prompt(row.get(self.question_key))
        prompt_ids = self.processor(images=images, text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
        answer = row[self.answer_key]
        text = prompt + format_completion(answer) if prompt else answer.strip()  # captioning: no leading space
        full = self.processor(images=images, text=[text], return_tensors="pt")
        input_ids = full.pop("input_ids")[0].tolist()
        full.pop("attention_mask", None)
        # text-aligned outputs lose their batch dim of 1; the others keep the processor's layout (concatenated later)
        aligned = {k: torch.as_tensor(v)[0] for k, v in full.items() if k in TEXT_ALIGNED_KEYS}
        arrays = {k: torch.as_tensor(v) for k, v in full.items() if k not in TEXT_ALIGNED_KEYS}
        ends = {self.tokenizer.eos_token_id, getattr(self.tokenizer, "sep_token_id", None)} - {None}
        if self.tokenizer.eos_token_id is not None and input_ids[-1] not in ends:
            input_ids.append(self.tokenizer.eos_token_id)
            aligned = {k: torch.cat([v, v[-1:]]) for k, v in aligned.items()}  # EOS sees what the last token saw
        shared = 0
        while shared < min(len(prompt_ids), len(input_ids)) and prompt_ids[shared] == input_ids[shared]:
            shared += 1
        labels = [-100] * shared + input_ids[shared:]
        return Encoded(input_ids, labels, text=aligned, arrays=arrays, batched=True)

    # ---- a batch ----

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        encoded = [self.encode(row) for row in rows]
        empty = [i for i, e in enumerate(encoded) if all(t == -100 for t in e.labels[1:])]
        if empty:
            raise ValueError(
                f"Row(s) {empty[:5]} of the batch have no answer token to score (all labels -100 after the first "
                f"position): the answer is empty or max_length={self.max_length} cut it off."
            )
        width = max(len(e.input_ids) for e in encoded)
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(rows), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), width), dtype=torch.long),
            "labels": torch.full((len(rows), width), -100, dtype=torch.long),
        }
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            batch["input_ids"][i, :n] = torch.tensor(e.input_ids)
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(e.labels)
        for part in ("text", "arrays"):
            for key in getattr(encoded[0], part):
                missing = [i for i, e in enumerate(encoded) if key not in getattr(e, part)]
                if missing:
                    raise ValueError(f"Rows {missing[:5]} lack {key!r}, which row 0 has.")
                values = [getattr(e, part)[key] for e in encoded]
                if part == "text":
                    batch[key] = self._pad_text(values, width)
                else:
                    batch[key] = self._join(key, values, concatenate=encoded[0].batched)
        with_passthrough(rows, batch)
        if rows[0].get("alternate") is not None:
            alternates = []
            for row in rows:
                alternate = self._with_answer(row, row["alternate"])
                if "index" in row:  # slot 1 of a cached reference: the alternate answer's log-prob
                    alternate.update(index=row["index"], slot=1)
                alternates.append(alternate)
            batch["alternate"] = self(alternates)
        return batch

    def _with_answer(self, row: dict[str, Any], answer: Any) -> dict[str, Any]:
        """The row with `answer` as its answer: text for raw rows, ids for `prompt_ids` rows."""
        row = {k: v for k, v in row.items() if k not in ("alternate", *PASSTHROUGH_KEYS)}
        if "prompt_ids" in row:
            if isinstance(answer, str):
                raise ValueError("prompt_ids rows take their alternate answer as token ids, got a string.")
            return {**row, "answer_ids": list(answer)}
        if "input_ids" in row:
            raise ValueError("input_ids rows cannot take an alternate answer; give prompt_ids and answer_ids.")
        return {**row, self.answer_key: answer}

    @staticmethod
    def _join(key: str, values: list[torch.Tensor], concatenate: bool) -> torch.Tensor:
        """Stack per-row arrays, or concatenate the processor's outputs along their first dim (which is how
        processors batch: a batch dim of 1 for most, the flattened patches of every image for Qwen2-VL-style ones)."""
        shapes = {tuple(v.shape[1:] if concatenate else v.shape) for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"{key!r} has different shapes across the batch ({sorted(shapes)}): use an image processor with a "
                "fixed output size, or per_device_train_batch_size=1."
            )
        return torch.cat(values) if concatenate else torch.stack(values)

    @staticmethod
    def _pad_text(values: list[torch.Tensor], width: int) -> torch.Tensor:
        out = values[0].new_zeros((len(values), width, *values[0].shape[1:]))
        for i, v in enumerate(values):
            out[i, : v.shape[0]] = v
        return out
