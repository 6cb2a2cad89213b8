"""Anchored-term translation with token alignment (Who's Harry Potter's second ingredient).

Idiosyncratic terms of the forget text ("Hogwarts") are replaced by generic ones ("the academy") so that a model
reading the translated text makes the predictions it would make without the forget knowledge. The translated text
tokenizes to a different length, so each original token is mapped to its counterpart in the translated text:

- a token outside every anchored term maps to the translated token with the same (shifted) character span;
- the first token of an anchored term maps to the first token of its generic replacement, so the prediction made
  *before* the term ("... went to" -> "Hogwarts") is read off the translated text ("... went to" -> "the");
- the remaining tokens of an anchored term have no counterpart (-1): no generic target is defined for them, so
  they are not trained on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .collator import QACollator
from .formatting import format_completion, format_prompt


@dataclass(frozen=True)
class Translation:
    """A text with its anchored terms replaced; `regions` are (start, end, new_start, new_end) character spans of
    each replaced term (with the space before it) in the original and in the translated text."""

    original: str
    translated: str
    regions: tuple[tuple[int, int, int, int], ...]

    def shift(self, position: int) -> int | None:
        """The translated position of an original character outside every region; None inside one."""
        delta = 0
        for start, end, _, new_end in self.regions:
            if position < start:
                break
            if position < end:
                return None
            delta = new_end - end
        return position + delta


def translate(text: str, anchored_terms: Mapping[str, str]) -> Translation:
    """Replace whole-word occurrences of each anchored term (longest first, case-sensitive) by its generic term.

    A region includes the space before the term: byte-level tokenizers attach it to the term's first token.
    """
    if not anchored_terms:
        return Translation(text, text, ())
    terms = sorted(anchored_terms, key=len, reverse=True)
    pattern = re.compile(r"( ?)(?<!\w)(" + "|".join(re.escape(t) for t in terms) + r")(?!\w)")
    pieces, regions, cursor, out_len = [], [], 0, 0
    for match in pattern.finditer(text):
        start, end = match.span()
        pieces.append(text[cursor:start])
        out_len += start - cursor
        replacement = match.group(1) + anchored_terms[match.group(2)]
        regions.append((start, end, out_len, out_len + len(replacement)))
        pieces.append(replacement)
        out_len += len(replacement)
        cursor = end
    pieces.append(text[cursor:])
    return Translation(text, "".join(pieces), tuple(regions))


def align_tokens(tokenizer: PreTrainedTokenizerBase, translation: Translation, add_special_tokens: bool):
    """Tokenize both sides; return (original ids, translated ids, alignment) with alignment[i] the index of the
    translated token that corresponds to original token i, or -1 (see the module docstring)."""
    if not tokenizer.is_fast:
        raise ValueError("Anchored-term alignment needs a fast tokenizer (character offsets).")
    orig = tokenizer(translation.original, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    trans = tokenizer(translation.translated, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    by_span = {tuple(span): j for j, span in enumerate(trans["offset_mapping"])}
    region_starts = {}  # a term's first token may or may not carry the space before it (offset conventions differ)
    for start, _, new_start, _ in translation.regions:
        space = int(translation.original[start] == " ")
        region_starts.update({start: new_start, start + space: new_start + space})
    starts_of_translated = {span[0]: j for j, span in reversed(list(enumerate(trans["offset_mapping"])))}
    alignment = []
    for i, (start, end) in enumerate(orig["offset_mapping"]):
        if start == end:  # a special token: the same one at the same place on both sides
            same = i < len(trans["input_ids"]) and trans["input_ids"][i] == orig["input_ids"][i]
            alignment.append(i if same else -1)
        elif start in region_starts:
            alignment.append(starts_of_translated.get(region_starts[start], -1))
        else:
            new_start, new_end = translation.shift(start), translation.shift(end - 1)
            inside = new_start is None or new_end is None
            alignment.append(-1 if inside else by_span.get((new_start, new_end + 1), -1))
    return orig["input_ids"], trans["input_ids"], alignment


def anchored_example(collator: QACollator, example: Mapping[str, str], anchored_terms: Mapping[str, str]) -> dict:
    """One question/answer row in the collator's layout (prompt masked, EOS appended), with its translation:
    `input_ids`/`labels` of the original, `translated_ids`, and `alignment` (translated index per original token)."""
    tokenizer = collator.tokenizer
    parts = [
        (format_prompt(example[collator.question_key], collator.prompt_template), True, False),
        (format_completion(example[collator.answer_key]), False, True),
    ]
    input_ids, labels, translated, alignment = [], [], [], []
    for text, special, scored in parts:
        ids, new_ids, align = align_tokens(tokenizer, translate(text, anchored_terms), special)
        alignment += [j + len(translated) if j >= 0 else -1 for j in align]
        input_ids += ids
        labels += ids if scored else [-100] * len(ids)
        translated += new_ids
    if tokenizer.eos_token_id is not None:
        alignment.append(len(translated))
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
        translated.append(tokenizer.eos_token_id)
    n = collator.max_length
    return {
        "input_ids": input_ids[:n],
        "labels": labels[:n],
        "translated_ids": translated[:n],
        "alignment": [j if j < n else -1 for j in alignment[:n]],
    }
