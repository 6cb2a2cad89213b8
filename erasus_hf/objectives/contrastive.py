"""Dual encoders (CLIP, X-CLIP, CLAP, ...): the per-example InfoNCE of the batch, in both directions.

CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
arXiv:2103.00020) is trained with the symmetric InfoNCE over a batch of N (media, text) pairs: with
s_ij = exp(logit_scale) * cos(media_i, text_j),

    L = 1/2 [ mean_i -log softmax_j(s_ij)[i]  +  mean_i -log softmax_j(s_ji)[i] ],

media -> text over the batch's texts, and text -> media over the batch's media. This objective returns the two
log-probabilities of each example as a two-"token" sequence, so every likelihood strategy (GA, GradDiff, NPO, SimNPO,
...) serves a dual encoder, and `Scores.mean_nll.mean()` of a batch of distinct captions is exactly the model's
`return_loss=True` loss.

Identical captions. An unlearning batch often holds many examples of one concept with the same caption ("a photo of
the digit seven"). Read literally, InfoNCE then counts the other copies of the caption as negatives of each image
(with k copies log p(text_i | image_i) <= -log k; when the whole batch shares the caption it is the constant -log B,
with no gradient at all) and the images of the same caption as negatives of each other. Here identical captions (same
token ids under the attention mask) are one text candidate, and text -> media counts every medium of the caption as a
positive:

    media -> text:  log p(c(i) | m_i) = log softmax_c(s(m_i, t_c))[c(i)]          over the distinct captions c
    text -> media:  log p(m_i | t_c(i)) = log sum_{j: c(j) = c(i)} softmax_j(s(m_j, t_c(i)))

With all captions distinct this is CLIP's InfoNCE exactly.

Extra negative captions (`negative_captions`): fixed texts (e.g. every class's caption, tokenized once) appended to
the text candidates of media -> text (media have none, so text -> media is unchanged). A forget batch of one concept
has a single distinct caption, so without them media -> text is log 1 = 0 for every example: gradient ascent gets no
gradient and the concept cannot be unlearned. Use them for concept/class unlearning (media -> text then is the
zero-shot classification over the candidate captions); leave them out for CLIP's in-batch loss as it is (e.g. image-
caption pairs with distinct captions).

The "vocabulary" of the aligned logits is the batch's candidate captions (distinct batch captions first, in order of
first appearance, then the negatives not already in the batch): `logits[i, 0]` are media i's logits over the
candidates, `logits[i, 1]` the text -> media logits of its caption grouped by caption (the log-sum-exp over each
caption's media; a candidate with no medium in the batch gets the most negative float, probability 0, so KL terms
stay finite). Both positions have the same target, the index of example i's caption, which the collator also writes
as `labels` so token-level strategies (WGA, UNDIAL, CE-U, ...) align their targets.

Strategies. The sequence-likelihood ones (GA, GradDiff, NPO, SimNPO, task vectors) and the token-level ones (WGA,
SatImp, UNDIAL, CE-U, SCRUB's KL) serve it. CE-U's default `ignore_first_token=True` drops the media -> text
position and keeps only text -> media, a constant on a one-caption forget batch: pass `ignore_first_token=False`.
PDU's logit-margin loss averages the raw logits over the vocabulary, which the zero-probability entries of negative
captions make infinite (the trainer stops on the non-finite loss): with negatives, use its "ga" or "npo" forget
term. There are no hidden states, so RMU-style strategies do not serve it.

The scores depend on the whole batch (the negatives are the other examples), so a per-example cached reference would
be taken in another batch: `cacheable_reference = False` makes the trainer use the frozen model itself (adapter-off
or a copy) for NPO-style references.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..data.collator import NOT_MODEL_INPUTS, with_passthrough
from .base import Objective, Scores, register_objective, token_logprobs_from_logits, unwrap_model

TEXT_KEYS = ("input_ids", "attention_mask")
UNSUPPORTED_TEXT_KEYS = ("token_type_ids", "position_ids")
MEDIA_KEYS = ("pixel_values", "input_features", "is_longer")  # CLIP/X-CLIP pixels, CLAP's mel features and flags
MEDIA_LOGITS = ("logits_per_image", "logits_per_video", "logits_per_audio")
MEDIA_FEATURES = ("get_image_features", "get_video_features", "get_audio_features")


def _masked_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, ...]]:
    """Each row's token ids under its attention mask: the identity of a caption, whatever the padding."""
    rows = zip(input_ids.tolist(), attention_mask.tolist(), strict=True)  # one device-to-host copy each
    return [tuple(t for t, keep in zip(ids, mask, strict=True) if keep) for ids, mask in rows]


def caption_groups(
    input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[list[tuple[int, ...]], list[int], torch.Tensor]:
    """(the distinct captions' token ids, in order of first appearance; the first row of each; [B] the caption index
    of every row)."""
    groups: dict[tuple[int, ...], int] = {}
    first_rows, index = [], []
    for row, key in enumerate(_masked_rows(input_ids, attention_mask)):
        if key not in groups:
            groups[key] = len(first_rows)
            first_rows.append(row)
        index.append(groups[key])
    return list(groups), first_rows, torch.tensor(index, dtype=torch.long, device=input_ids.device)


def _pad_right(
    ids: torch.Tensor, mask: torch.Tensor, width: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    extra = width - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return nn.functional.pad(ids, (0, extra), value=pad_token_id), nn.functional.pad(mask, (0, extra), value=0)


class ContrastiveCollator:
    """Collate (media, caption) rows for a dual encoder.

    Rows carry `input_ids` (a list, unpadded or padded), optional `attention_mask`, and the media inputs: CLIP's
    `pixel_values` [C, H, W], X-CLIP's `pixel_values` [T, C, H, W], CLAP's `input_features` (+ `is_longer`); any
    processor output of one row. Text is padded on the right with `pad_token_id`; media are stacked. `index`/`slot`
    pass through; `labels` [B, 2] is each row's caption index among the batch's distinct captions (both directions).
    Other columns (the caption text, a class label) are bookkeeping and stay out of the batch.
    """

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        first = examples[0]
        media = [key for key in MEDIA_KEYS if key in first]
        if "input_ids" not in first or not {"pixel_values", "input_features"} & set(media):
            raise ValueError(
                f"A contrastive row needs `input_ids` (its caption) and its media: one of {MEDIA_KEYS[:2]} "
                f"(+ `is_longer` for CLAP); got keys {sorted(first)}."
            )
        ids = [torch.as_tensor(e["input_ids"], dtype=torch.long).reshape(-1) for e in examples]
        masks = [
            torch.as_tensor(e["attention_mask"], dtype=torch.long).reshape(-1)
            if e.get("attention_mask") is not None
            else torch.ones_like(i)
            for e, i in zip(examples, ids, strict=True)
        ]
        width = max(len(i) for i in ids)
        batch = {
            "input_ids": torch.stack(
                [nn.functional.pad(i, (0, width - len(i)), value=self.pad_token_id) for i in ids]
            ),
            "attention_mask": torch.stack([nn.functional.pad(m, (0, width - len(m)), value=0) for m in masks]),
        }
        for key in media:
            batch[key] = torch.stack([torch.as_tensor(e[key]) for e in examples])
        *_, index = caption_groups(batch["input_ids"], batch["attention_mask"])
        batch["labels"] = index[:, None].repeat(1, 2)
        return with_passthrough(examples, batch)


@register_objective
class ContrastiveObjective(Objective):
    """The per-example InfoNCE of a dual encoder (see the module docstring): two "tokens" per example, media ->
    text and text -> media, at the model's learned temperature (the logits the model returns are already scaled by
    `exp(logit_scale)`; CLAP scales each direction by its own).

    Args:
        negative_captions: extra text candidates for media -> text: token ids (a list of id lists), or a tokenizer's
            output (`input_ids` + `attention_mask`, padded). Tokenize them as the training captions are (the same
            special tokens), e.g. `tokenizer(class_captions)`.
        pad_token_id: the id text is padded with (default: the model's `text_config.pad_token_id`, else 0). The
            attention mask, not this id, decides which tokens are a caption.
    """

    name = "contrastive"
    cacheable_reference = False  # a score depends on the batch's other examples
    collator: ContrastiveCollator  # the side collator (`collator_for`), also for batching rows by hand

    def __init__(
        self,
        negative_captions: Sequence[Sequence[int]] | Mapping[str, Any] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.negatives = _as_id_lists(negative_captions) if negative_captions is not None else []
        self.pad_token_id = pad_token_id
        self.collator = ContrastiveCollator(pad_token_id if pad_token_id is not None else 0)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Dual encoders trained with a softmax contrastive loss: a text tower and an image/video/audio tower, a
        `return_loss` forward, no LM head, and no SigLIP-style `logit_bias` (a sigmoid loss, not InfoNCE)."""
        model = unwrap_model(model)
        if not hasattr(model, "get_text_features") or not any(hasattr(model, f) for f in MEDIA_FEATURES):
            return False
        if hasattr(model, "logit_bias") or (hasattr(model, "can_generate") and model.can_generate()):
            return False
        return "return_loss" in inspect.signature(type(model).forward).parameters

    def validate_model(self, model: nn.Module) -> None:
        base = unwrap_model(model)
        if hasattr(base, "logit_bias"):
            raise ValueError(
                f"{type(base).__name__} is trained with a pairwise sigmoid loss (SigLIP), not InfoNCE; the contrastive"
                " objective would score it with a loss it was not trained with."
            )
        if not hasattr(base, "get_text_features") or not any(hasattr(base, f) for f in MEDIA_FEATURES):
            raise ValueError(
                f"The contrastive objective needs a dual encoder with a text tower and one of {MEDIA_FEATURES} "
                f"(CLIPModel, XCLIPModel, ClapModel, ...); {type(base).__name__} has none."
            )
        if self.pad_token_id is None:
            text_config = getattr(getattr(base, "config", None), "text_config", None)
            pad = getattr(text_config, "pad_token_id", None)
            self.pad_token_id = pad if pad is not None else 0
            self.collator.pad_token_id = self.pad_token_id

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    def candidates(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate ids [C, L], their attention mask, [B] each example's candidate index): the batch's distinct
        captions in order of first appearance, then the negative captions not already among them."""
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        captions, rows, index = caption_groups(input_ids, attention_mask)
        ids, mask = input_ids[rows], attention_mask[rows]
        seen = set(captions)
        extra = [n for n in dict.fromkeys(self.negatives) if n not in seen]
        if extra:
            width = max(ids.shape[1], max(len(n) for n in extra))
            pad = self.pad_token_id if self.pad_token_id is not None else 0
            extra_ids = torch.full((len(extra), width), pad, dtype=ids.dtype, device=ids.device)
            extra_mask = torch.zeros((len(extra), width), dtype=mask.dtype, device=mask.device)
            for row, tokens in enumerate(extra):
                extra_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
                extra_mask[row, : len(tokens)] = 1
            ids, mask = _pad_right(ids, mask, width, pad)
            ids, mask = torch.cat([ids, extra_ids]), torch.cat([mask, extra_mask])
        return ids, mask, index

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        if hidden_layer is not None:
            raise ValueError(
                "The contrastive objective scores a dual encoder's similarity logits and gives no hidden states; "
                "strategies that need them (RMU, ...) do not serve it."
            )
        if "input_ids" not in batch:
            raise ValueError(f"A contrastive batch needs `input_ids` (the captions); got keys {sorted(batch)}.")
        unsupported = [k for k in UNSUPPORTED_TEXT_KEYS if k in batch]
        if unsupported:
            raise ValueError(f"The contrastive objective pads and deduplicates captions itself; drop {unsupported}.")
        media = {k: v for k, v in batch.items() if k not in TEXT_KEYS + NOT_MODEL_INPUTS}
        if not media:
            raise ValueError(f"A contrastive batch needs media inputs (e.g. {MEDIA_KEYS}); got keys {sorted(batch)}.")
        ids, mask, index = self.candidates(batch)
        outputs = model(input_ids=ids, attention_mask=mask, **media)
        per_media = next((getattr(outputs, k) for k in MEDIA_LOGITS if getattr(outputs, k, None) is not None), None)
        per_text = getattr(outputs, "logits_per_text", None)
        if per_media is None or per_text is None:
            raise ValueError(
                f"{type(unwrap_model(model)).__name__} returned no `logits_per_text` and one of {MEDIA_LOGITS}; the "
                "contrastive objective needs a dual encoder's similarity logits."
            )
        logits = contrastive_logits(per_media.float(), per_text.float(), index)
        labels = index[:, None].repeat(1, 2)
        given = batch.get("labels")
        if given is not None and (given.shape != labels.shape or not torch.equal(given.to(labels.device), labels)):
            raise ValueError(
                "The batch's `labels` are not the caption indices of its distinct captions; let ContrastiveCollator "
                "write them (or leave them out)."
            )
        logprobs, scored = token_logprobs_from_logits(logits, labels)
        return Scores(token_logprobs=logprobs, mask=scored, logits=logits)


def contrastive_logits(per_media: torch.Tensor, per_text: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, 2, C] logits over the C candidate captions: media -> text (`per_media` [B, C] as it is) and text -> media
    (`per_text` [C, B] of each example's caption, log-sum-exp'd over the media of each caption; most negative float
    where a candidate has no medium). `index` [B] is each example's caption among the candidates."""
    num_batch_captions = int(index.max()) + 1  # the batch's captions come first among the candidates
    lowest = torch.finfo(per_text.dtype).min
    text = per_text[:num_batch_captions]  # [U, B]: each batch caption against every medium
    group = index[None, :].expand_as(text)
    shape = (num_batch_captions, per_media.shape[1])
    # grouped[c, g] = log sum_{j: caption of j = g} exp(s(t_c, m_j)), a log-sum-exp per group (scatter, no [U, C, B])
    peak = text.new_full(shape, lowest).scatter_reduce(1, group, text.detach(), "amax")
    total = text.new_zeros(shape).scatter_add(1, group, (text - peak.gather(1, group)).exp())
    has_media = torch.zeros(shape[1], dtype=torch.bool, device=index.device)
    has_media[index] = True
    # a candidate without media (a negative caption) gets probability 0 through a finite logit: no NaN in KL terms
    grouped = (peak + total.masked_fill(~has_media, 1.0).log()).masked_fill(~has_media, lowest)
    return torch.stack([per_media, grouped[index]], dim=1)


def _as_id_lists(captions: Sequence[Sequence[int]] | Mapping[str, Any]) -> list[tuple[int, ...]]:
    """Token-id tuples of the negative captions, with padding removed by the attention mask when there is one."""
    if isinstance(captions, Mapping):
        if "input_ids" not in captions:
            raise ValueError(f"negative_captions needs `input_ids` (a tokenizer's output); got {sorted(captions)}.")
        ids = [list(torch.as_tensor(i).reshape(-1).tolist()) for i in captions["input_ids"]]
        masks = captions.get("attention_mask")
        if masks is not None:
            ids = [
                [t for t, m in zip(i, torch.as_tensor(k).reshape(-1).tolist(), strict=True) if m]
                for i, k in zip(ids, masks, strict=True)
            ]
        captions = ids
    out = [tuple(int(t) for t in ids) for ids in captions]
    if not out or any(len(ids) == 0 for ids in out):
        raise ValueError("negative_captions must be non-empty token-id lists (tokenize the captions first).")
    return out
