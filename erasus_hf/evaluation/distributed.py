"""Evaluation under several processes: shard the examples, compute, gather in order.

`map_sharded(fn, items)` gives exactly what `fn(items)` gives on one process: each process takes a contiguous block
of `items` (accelerate's `split_between_processes`), and the blocks' results are gathered in rank order. The
per-example computations of every metric go through it, so their summaries do not depend on the process count.
The blocks are padded to one length (the last item repeated, its results dropped): a model sharded across processes
(FSDP, DeepSpeed ZeRO-3) needs every process in every forward pass, so a process with one block fewer would leave
the others waiting in their all-gather forever. `sharded=False` runs the full set on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from accelerate import PartialState
from accelerate.utils import gather_object

T = TypeVar("T")
R = TypeVar("R")


def map_sharded(fn: Callable[[list[T]], list[R]], items: Sequence[T], sharded: bool = True) -> list[R]:
    """`fn(items)`, computed block-wise across the processes of the current run and gathered in order."""
    state = PartialState()
    if not sharded or state.num_processes == 1:
        return fn(list(items))
    per_process, extras = divmod(len(items), state.num_processes)
    width = per_process + (1 if extras else 0)  # every padded block's length
    with state.split_between_processes(list(items), apply_padding=True) as block:
        out = fn(list(block))
    if len(out) != width:
        raise RuntimeError(f"fn gave {len(out)} results for {width} items; fn must map one to one.")
    gathered = gather_object(out)
    # rank r's block holds per_process (+1 for the first `extras` ranks) items, then its padding
    return [
        result
        for rank in range(state.num_processes)
        for result in gathered[rank * width : rank * width + per_process + int(rank < extras)]
    ]
