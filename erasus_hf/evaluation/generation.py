"""Batched greedy generation and the ROUGE-L scores that compare a generation with a reference.

Generation pads on the LEFT (the prompt must end right where the new tokens start), while the tokenizers of this
package pad on the right for training: the padding side is passed to each tokenizer call, so the tokenizer itself is
never modified. Only the new tokens are decoded.

ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries") is computed with Google's
``rouge_score`` package, ``RougeScorer(["rougeL"], use_stemmer=True)``: both strings are lower-cased, split into
alphanumeric tokens and Porter-stemmed; with LCS the length of their longest common subsequence of tokens,
``recall = LCS / len(reference tokens)``, ``precision = LCS / len(prediction tokens)`` and
``F1 = 2 P R / (P + R)`` (0 when either is 0).

Prompts are strings (raw text, tokenized as the models of this package were trained: ``tokenizer(prompt)``, BOS
included) or token ids (`data.formats.TextFormat.generation_prompt`: a question through the chat template or the
prompt template, exactly as training renders it; ids, because a chat template's text already holds the BOS and
tokenizing it again would add a second one).

Long prompts. A prompt and its new tokens must fit the model's positions (``config.max_position_embeddings``;
``transformers`` only warns past it, and the scores are then computed on positions the model never trained on).
`prompt_budget` is the room left for the prompt once the new tokens are counted, and `greedy_generate` cuts longer
prompts from the LEFT (`cut_left`): the end of the prompt, where the continuation starts, is kept, as are the
special tokens at either end (the BOS the tokenizer adds; a chat prompt's leading special tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from rouge_score import rouge_scorer
from torch import nn
from tqdm.auto import tqdm
from transformers import BatchEncoding, PreTrainedTokenizerBase
from transformers.utils.logging import is_progress_bar_enabled

from ..reference import eval_mode
from .distributed import map_sharded

Prompt = str | Sequence[int]
"""A generation prompt: raw text, or the token ids of a rendered prompt (`TextFormat.generation_prompt`)."""


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int = 32,
    desc: str | None = None,
    sharded: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` (``model.generate(do_sample=False)``), batched with left padding.

    A string prompt is tokenized as the models of this package were trained (``tokenizer(prompt)``, BOS included);
    a list of token ids (`TextFormat.generation_prompt`) is used as it is.
    Each row ends at its first EOS (``tokenizer.eos_token_id``) or after `max_new_tokens`; a batch stops as soon as
    every row has produced its EOS (``generate`` stops when no row is unfinished), so `max_new_tokens` is a cap, not
    a length. Returns, per prompt, the decoded NEW tokens before the EOS (special tokens skipped, whitespace
    stripped), as open-unlearning cuts its generations at the EOS. Under several processes the prompts are split
    between them (``distributed.map_sharded``; pass ``sharded=False`` for a model sharded across processes).
    A prompt of more than `max_prompt_tokens` tokens (BOS included) is cut from the left to that many (`cut_left`);
    None leaves every prompt whole (`prompt_budget` gives the limit that fits the model).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of prompts (strings or token id lists), not one string.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("The tokenizer has no pad token; set one (ensure_pad_token does it from EOS).")
    check_prompts(prompts)
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    device = next(model.parameters()).device

    def generate_block(block: list[Prompt]) -> list[str]:
        outputs: list[str] = []
        starts = range(0, len(block), batch_size)
        with eval_mode(model):
            for start in tqdm(starts, desc=desc, disable=desc is None or not is_progress_bar_enabled(), leave=False):
                chunk = block[start : start + batch_size]
                encoded = encode_prompts(tokenizer, chunk, max_prompt_tokens).to(device)
                generated = model.generate(
                    input_ids=encoded["input_ids"],
                    attention_mask=encoded["attention_mask"],
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new_tokens = generated[:, encoded["input_ids"].shape[1] :].tolist()
                rows = [_until_eos(row, tokenizer.eos_token_id) for row in new_tokens]
                outputs.extend(t.strip() for t in tokenizer.batch_decode(rows, skip_special_tokens=True))
        return outputs

    return map_sharded(generate_block, list(prompts), sharded=sharded)


def model_context(model: nn.Module) -> int | None:
    """The positions the model was built for (``config.max_position_embeddings``); None when its config declares no
    limit (relative-position models such as T5)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def prompt_budget(model: nn.Module, max_new_tokens: int, option: str = "max_new_tokens") -> int | None:
    """The most prompt tokens that leave room for `max_new_tokens` new ones within the model's positions
    (`model_context` minus `max_new_tokens`); None when the model declares no limit.

    Raises ValueError, naming `option` (the setting that holds `max_new_tokens`), when the new tokens alone fill the
    context: no prompt would fit, so it fails before any compute.
    """
    context = model_context(model)
    if context is None:
        return None
    if max_new_tokens >= context:
        raise ValueError(
            f"{option}={max_new_tokens} leaves no room for the prompt: the model has max_position_embeddings="
            f"{context}, and the prompt and its new tokens must fit in it. Lower {option} below {context}."
        )
    return context - max_new_tokens


def check_prompts(prompts: Sequence[Prompt]) -> None:
    """Raise unless every prompt is a string or a non-empty list of token ids (ints)."""
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            continue
        is_ids = isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not is_ids or len(prompt) == 0:
            raise TypeError(
                f"Prompt {i} must be a string or a non-empty list of token ids (TextFormat.generation_prompt), got "
                f"{type(prompt).__name__}."
            )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[tuple[list[int], list[int]]]:
    """(ids, special-token mask) of every prompt: a string tokenized (BOS included), token ids as given (their
    special tokens marked by the tokenizer's `get_special_tokens_mask`)."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = {"input_ids": [], "special_tokens_mask": []}
    if texts:
        encoded = tokenizer(texts, return_special_tokens_mask=True)
    tokenized = iter(zip(encoded["input_ids"], encoded["special_tokens_mask"], strict=True))
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids, mask = next(tokenized)
            out.append((list(ids), list(mask)))
        else:
            ids = list(prompt)
            out.append((ids, tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)))
    return out


def count_longer(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], max_prompt_tokens: int | None) -> int:
    """How many of `prompts` tokenize (as `greedy_generate` does, BOS included) to more than `max_prompt_tokens`."""
    if max_prompt_tokens is None:
        return 0
    return sum(len(ids) > max_prompt_tokens for ids, _ in prompt_ids(tokenizer, prompts))


def cut_left(ids: Sequence[int], special_mask: Sequence[int], limit: int) -> list[int]:
    """`ids` cut from the left to `limit` tokens, keeping the special tokens the tokenizer put at either end
    (`special_mask`, 1 for those: the BOS of a Llama prompt) and the last tokens of the text between them.

    When the specials alone take `limit` tokens or more, the last `limit` tokens are kept.
    """
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    head = next((i for i, special in enumerate(special_mask) if not special), len(ids))
    tail = next((i for i, special in enumerate(reversed(special_mask)) if not special), 0)
    room = limit - head - tail
    if room < 1:
        return ids[-limit:]
    end = len(ids) - tail
    return ids[:head] + ids[end - room : end] + ids[end:]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], max_prompt_tokens: int | None = None
) -> BatchEncoding:
    """`prompts` as ids (`prompt_ids`: strings tokenized, BOS included; id lists as given), each cut to
    `max_prompt_tokens` by `cut_left`, left-padded into tensors."""
    rows = [
        ids if max_prompt_tokens is None else cut_left(ids, mask, max_prompt_tokens)
        for ids, mask in prompt_ids(tokenizer, prompts)
    ]
    return tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")


def _until_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    """`tokens` up to (not including) the first `eos_token_id` (what follows it in a batch is padding)."""
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _rouge_l(prediction: str, reference: str) -> rouge_scorer.scoring.Score:
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError(f"ROUGE compares two strings, got {type(prediction).__name__} and {type(reference).__name__}.")
    return _scorer().score(target=reference, prediction=prediction)["rougeL"]


def rouge_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: LCS(prediction, reference) / number of reference tokens (stemmed; see the module doc).

    TOFU's ROUGE (Maini et al. 2024, arXiv:2401.06121) and MUSE's KnowMem (Shi et al. 2024, arXiv:2407.06460).
    """
    return float(_rouge_l(prediction, reference).recall)


def rouge_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1: harmonic mean of LCS / reference tokens and LCS / prediction tokens (see the module doc).

    MUSE's VerbMem (Shi et al. 2024, arXiv:2407.06460).
    """
    return float(_rouge_l(prediction, reference).fmeasure)
