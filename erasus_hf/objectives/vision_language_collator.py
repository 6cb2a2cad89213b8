"""The side collator of the vision-language objective: (image, question, answer) rows, or rows already tokenized, into
padded batches whose labels score the answer tokens only (prompt, padding and image placeholders are -100)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.collator import NOT_MODEL_INPUTS, PASSTHROUGH_KEYS, with_passthrough
from ..data.formatting import format_completion

# Per-row tensors indexed by text position ([T, ...]): padded along the text, not stacked as image data.
TEXT_ALIGNED_KEYS = ("image_attention_mask", "cross_attention_mask", "token_type_ids", "mm_token_type_ids")


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
        for key in encoded[0].text:
            batch[key] = self._pad_text(_column(key, [e.text for e in encoded]), width)
        for key in encoded[0].arrays:
            batch[key] = self._join(key, _column(key, [e.arrays for e in encoded]), concatenate=encoded[0].batched)
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


def _column(key: str, rows: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Every row's `key`; a row without it (row 0 has it) is an error."""
    missing = [i for i, row in enumerate(rows) if key not in row]
    if missing:
        raise ValueError(f"Rows {missing[:5]} lack {key!r}, which row 0 has.")
    return [row[key] for row in rows]
