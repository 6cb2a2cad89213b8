"""The model as a ledger's requests left it, rebuilt from its artifacts on disk.

Adapter mode: the starting full model (the original, or the last merge) with every later request's adapter loaded
under the request's id and all of them active at once (PEFT's LoRA layers add the active adapters' updates), or,
with `merged=True`, those adapters merged into the weights one by one in request order. Full mode: the last
request's model. Every request trains on the merged state, built this same way from the files, so a replay of the
ledger, which builds it the same way, trains on the same weights bit for bit."""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..model_source import load_causal_lm
from .record import DeletionLedger


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of every tensor of `model`'s state dict (names and float32 bytes, sorted by name): the ledger's
    ``state_sha256`` of a merged model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_state(
    ledger: DeletionLedger, merged: bool = True, model_init_kwargs: dict | None = None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(the model after every request of `ledger`, its tokenizer). `merged=False` keeps the adapters stacked (a
    `PeftModel` whose active adapters are the requests' ids): what one ships to audit or revert a single request."""
    start, stacked = ledger.stack()
    model, tokenizer = load_causal_lm(start, model_init_kwargs=model_init_kwargs)
    if not stacked:
        return model, tokenizer
    from peft import PeftModel

    first, *rest = stacked
    model = PeftModel.from_pretrained(model, ledger.artifact_path(first.artifact), adapter_name=first.id)
    for record in rest:
        model.load_adapter(ledger.artifact_path(record.artifact), adapter_name=record.id)
    names = [r.id for r in stacked]
    model.base_model.set_adapter(names)
    for param in model.parameters():  # set_adapter makes the active adapters trainable; a loaded state is not
        param.requires_grad_(False)
    if merged:
        model = model.merge_and_unload(adapter_names=names)
    model.eval()
    return model, tokenizer
