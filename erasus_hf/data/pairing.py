"""Pair every forget example with a retain example: the forget set is the epoch anchor."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback


class ForgetRetainDataset(Dataset):
    """Item i is `{"forget": forget[i] + {"index": offset + i}, "retain": retain[partner(i)]}`.

    Retain partners come from a seeded permutation drawn anew each epoch (`set_epoch`, which the Trainer's data
    loader calls), so every retain example is used before any repeats and a run is reproducible: the partners are a
    function of (`seed`, epoch) alone, so a run resumed mid-epoch pairs as the interrupted one did. `index` lets a
    cached reference look up the forget example's log-prob (slot 0; a DPO-style `alternate` answer is slot 1);
    `index_offset` keeps indices of several forget sets apart.
    """

    def __init__(self, forget: Any, retain: Any | None = None, seed: int = 0, index_offset: int = 0) -> None:
        if len(forget) == 0:
            raise ValueError("The forget set is empty: there is nothing to unlearn.")
        if retain is not None and len(retain) == 0:
            raise ValueError("The retain set is empty; pass retain_dataset=None if there is no retain data.")
        self.forget = forget
        self.retain = retain
        self.seed = seed
        self.index_offset = index_offset
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if self.retain is None:
            self._partners = None
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        rounds = -(-len(self.forget) // len(self.retain))
        self._partners = torch.cat([torch.randperm(len(self.retain), generator=generator) for _ in range(rounds)])

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.index_offset + i
        item = {"forget": {**self.forget[i], "index": index}}
        if isinstance(item["forget"].get("alternate"), dict):  # slot 1 of the cache: the alternate answer
            item["forget"]["alternate"] = {**item["forget"]["alternate"], "index": index, "slot": 1}
        if self._partners is not None:
            item["retain"] = self.retain[int(self._partners[i])]
        return item


class PairingEpochCallback(TrainerCallback):
    """Redraw the retain partners at every epoch (accelerate does not always forward `set_epoch` to the dataset).

    The epoch that begins is the integer part of `state.epoch`: 1 at the start of epoch 1, and 1 again when a run
    resumes from a checkpoint at epoch 1.67 (the Trainer sets `state.epoch = epoch + (step + 1) / steps_in_epoch`,
    exactly the next integer after an epoch's last step). Rounding would pair the rest of epoch 1 as epoch 2."""

    def __init__(self, dataset: ForgetRetainDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(math.floor(state.epoch or 0))
