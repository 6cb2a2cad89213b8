"""Unified Concept Editing (UCE): a closed-form edit of every cross-attention key and value projection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..strategies.config import StrategyConfig
from ..strategies.registry import register_strategy
from .common import DiffusionStrategy, select_trainable
from .lora import has_lora
from .objective import DiffusionObjective

TOKEN_WINDOWS = ("last_to_end", "last")


def uce_edit(
    weight: torch.Tensor,
    erase: torch.Tensor,
    guide: torch.Tensor,
    preserve: torch.Tensor | None,
    lamb: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """W_new = [lambda W + s_e sum_i v*_i c_i^T + s_p sum_j (W c_j) c_j^T] [lambda I + s_e sum_i c_i c_i^T
    + s_p sum_j c_j c_j^T]^-1 with v*_i = W g_i, in float32; returned in `weight`'s dtype.

    `weight` is [out, in]; `erase` (the c_i), `guide` (the g_i, row-aligned with `erase`) and `preserve` (the c_j)
    are [n, in] embeddings.
    """
    w = weight.float()
    c, g = erase.float(), guide.float()
    eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    numerator = lamb * w + erase_scale * (g @ w.T).T @ c
    denominator = lamb * eye + erase_scale * c.T @ c
    if preserve is not None and preserve.shape[0]:
        p = preserve.float()
        numerator = numerator + preserve_scale * (p @ w.T).T @ p
        denominator = denominator + preserve_scale * p.T @ p
    return (numerator @ torch.linalg.inv(denominator)).to(weight.dtype)


def last_token_positions(objective: DiffusionObjective, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T], positions [B]): each prompt's padded token ids and the position of its last token before
    EOS, `attention_mask.sum() - 2` as in the authors' `uce_sd_erase.py` (BOS, the prompt, EOS, then padding).

    The attention mask, not `ids != pad_token_id`: Stable Diffusion 1.x's CLIP tokenizer pads with its EOS token, so
    counting non-pad ids also drops the EOS and lands one token early (on BOS for a one-word concept). The empty
    prompt gives position 0, its BOS, as in the authors' code (the guide "" of an erasure).
    """
    tokens = objective.collator.encode_text(prompts)
    if "attention_mask" not in tokens:
        raise ValueError(
            f"UCE finds each concept's last token from the tokenizer's attention mask, but "
            f"{type(objective.tokenizer).__name__} returned none; use a tokenizer with return_attention_mask=True."
        )
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    positions = mask.sum(1) - 2
    eos = objective.tokenizer.eos_token_id
    after = ids.gather(1, (positions + 1).clamp(min=0)[:, None])[:, 0]  # the token after the last one: EOS
    if (positions < 0).any() or (eos is not None and (after != eos).any()):
        raise ValueError(
            "UCE expects prompts tokenized as BOS, tokens, EOS (as CLIP's tokenizer does); the token after the "
            "concept's last one is not the tokenizer's eos_token. Use the text encoder's own (CLIP) tokenizer."
        )
    return ids, positions


def concept_token_embeddings(
    objective: DiffusionObjective, prompts: Sequence[str], window: str, device: torch.device | str
) -> list[torch.Tensor]:
    """For each prompt, the text-encoder embeddings UCE edits with: its last token before EOS ("last", see
    `last_token_positions`), or that token and every position after it up to the padded length ("last_to_end": the
    EOS and padding positions also carry the concept through the causal text encoder, as in the authors' first
    release, `train_erase.py`)."""
    ids, positions = last_token_positions(objective, prompts)
    embeddings = objective.encode_prompts(ids.to(device))
    out = []
    for row, last in zip(embeddings, positions.tolist(), strict=True):
        out.append(row[last : last + 1] if window == "last" else row[last:])
    return out


def aligned(concepts: list[torch.Tensor], guides: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each concept's token embeddings with its guide's, position by position from the last token on, cut to
    the shorter of the two (the authors' alignment)."""
    cs, gs = [], []
    for c, g in zip(concepts, guides, strict=True):
        n = min(len(c), len(g))
        cs.append(c[:n])
        gs.append(g[:n])
    return torch.cat(cs), torch.cat(gs)


@dataclass
class UCEConfig(StrategyConfig):
    guide_prompts: list[str] | str = field(
        default="",
        metadata={
            "help": "What each erased concept is mapped to: one prompt for all, or a list with one per forget row; "
            "'' (the unconditional embedding) erases."
        },
    )
    lamb: float = field(
        default=0.5,
        metadata={
            "help": "lambda (> 0), the regulariser that keeps W near the original and the system invertible; 0.5."
        },
    )
    erase_scale: float = field(default=1.0, metadata={"help": "s_e, the weight of the erased concepts; 1."})
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p, the weight of the preserved concepts; 1."})
    token_window: str = field(
        default="last",
        metadata={
            "help": "Which token embeddings are edited: 'last' the concept's last token before EOS (the authors' "
            "uce_sd_erase.py), 'last_to_end' that token and every position after it (their first release)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_window not in TOKEN_WINDOWS:
            raise ValueError(f"Unknown token_window {self.token_window!r}; valid: {TOKEN_WINDOWS}")
        if self.lamb <= 0:
            raise ValueError(f"UCE needs lamb > 0 (the regulariser keeps the system invertible), got {self.lamb}")


@register_strategy
class UCE(DiffusionStrategy):
    """Unified Concept Editing.

    Gandikota, Orgad, Belinkov, Materzynska, Bau 2024, "Unified Concept Editing in Diffusion Models", WACV
    (arXiv:2308.14761).

    For every cross-attention key and value projection W (`attn2.to_k`, `attn2.to_v`):
    W_new = [lambda W + s_e sum_i v*_i c_i^T + s_p sum_j (W c_j) c_j^T] [lambda I + s_e sum_i c_i c_i^T
    + s_p sum_j c_j c_j^T]^-1, v*_i = W c(guide_i), c_i the text embedding of the concept to erase (the forget
    rows' `prompt`), c_j those of the concepts to preserve (the retain rows' `prompt`; `retain_loss="none"` edits
    without them). The inverse is computed in float32. One-shot: `trainer.train()` applies the edit, no training
    loop; the edited projections are what `save_model` writes.

    Token embeddings: `token_window="last"` (default) uses the embedding of the concept's last token before EOS
    (found from the tokenizer's attention mask, as the authors' `uce_sd_erase.py` does; for the empty guide "" that
    is its BOS), one vector per concept; `"last_to_end"` uses that token and every position after it (EOS,
    padding), aligned with the guide's from its last token, as the authors' first release (`train_erase.py`) does
    for erased concepts (that release used every position of a preserved prompt; here preserved concepts use the
    same window).
    (On the digit model "last" keeps the other digits: mean accuracy 0.656 -> 0.667, against 0.522 with
    "last_to_end"; both remove the erased digit.)

    Defaults: lambda = 0.5, erase_scale s_e = 1, preserve_scale s_p = 1, guide "" (the unconditional embedding:
    erasure) for every concept; `guide_prompts` maps concepts to other guides (a list, one per forget row, or a
    single string for all).
    """

    name = "uce"
    paper = "https://arxiv.org/abs/2308.14761"
    one_shot = True
    config_class = UCEConfig

    def prepare_model(self, model: nn.Module) -> None:
        if has_lora(model):
            raise ValueError(
                "UCE edits the UNet's key/value projections in closed form; run it without a LoRA adapter."
            )
        select_trainable(model, "cross_attention_kv", "UCE")  # the tensors it edits (and that save_model writes)

    def forget_loss(self, ctx, forget):
        raise RuntimeError("UCE is a one-shot edit: call trainer.train(), which applies it.")

    @torch.no_grad()
    def apply(self, trainer) -> dict[str, float]:
        objective = trainer.model_objective
        if not isinstance(objective, DiffusionObjective):
            raise TypeError("UCE needs the DiffusionObjective.")
        unet = trainer.accelerator.unwrap_model(trainer.model)
        device = next(unet.parameters()).device
        concepts = list(trainer.forget_rows["prompt"])
        guides = [self.guide_prompts] * len(concepts) if isinstance(self.guide_prompts, str) else self.guide_prompts
        if len(guides) != len(concepts):
            raise ValueError(f"UCE got {len(guides)} guide prompts for {len(concepts)} concepts.")
        preserved = list(trainer.retain_rows["prompt"]) if trainer.retain_rows is not None else []
        erase, guide = aligned(
            concept_token_embeddings(objective, concepts, self.token_window, device),
            concept_token_embeddings(objective, guides, self.token_window, device),
        )
        preserve = (
            torch.cat(concept_token_embeddings(objective, preserved, self.token_window, device)) if preserved else None
        )
        edited = 0
        for name, module in unet.named_modules():
            if isinstance(module, nn.Linear) and ("attn2.to_k" in name or "attn2.to_v" in name):
                if module.bias is not None:
                    raise ValueError(f"UCE edits bias-free projections; {name} has a bias.")
                module.weight.copy_(
                    uce_edit(module.weight, erase, guide, preserve, self.lamb, self.erase_scale, self.preserve_scale)
                )
                edited += 1
        if edited == 0:
            raise ValueError("UCE found no cross-attention key/value projection (attn2.to_k / attn2.to_v).")
        return {"uce_edited_projections": float(edited), "uce_preserved_concepts": float(len(preserved))}
