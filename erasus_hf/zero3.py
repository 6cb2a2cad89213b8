"""Whole copies of models partitioned by DeepSpeed ZeRO-3.

Under ZeRO-3 (`zero.Init`, as `from_pretrained` loads under a ZeRO-3 config, and inside the engine) each process
holds only its slice of every weight; `copy.deepcopy` copies the partitioning's bookkeeping but not the weights (the
copy's tensors are empty). The frozen reference copy and the merged model are built with the whole weights instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def is_partitioned(model: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned `model`'s weights (its parameters carry a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def whole_copy(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of the partitioned `model` whose parameters are plain tensors holding the whole weights.

    `state_dict`: the whole weights already gathered (the Trainer's ZeRO-3 `get_state_dict`, on the saving process),
    keyed as `model.state_dict()`; None gathers them now, one parameter at a time, which is a collective: every
    process must call it.
    """
    ref = copy.deepcopy(model)
    copied = dict(ref.named_parameters(remove_duplicate=False))
    whole: dict[int, nn.Parameter] = {}  # one new parameter per copied one: tied weights stay tied
    for name, param in model.named_parameters(remove_duplicate=False):
        target = copied[name]
        if id(target) not in whole:
            if state_dict is not None:
                data = state_dict[name].detach().clone()
            else:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param]):
                    data = param.data.detach().clone()
            whole[id(target)] = nn.Parameter(data.to(param.dtype), requires_grad=param.requires_grad)
        owner, _, leaf = name.rpartition(".")
        setattr(ref.get_submodule(owner), leaf, whole[id(target)])
    return ref
