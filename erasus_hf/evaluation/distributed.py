"""Evaluation under several processes: shard the examples, compute, gather in order.

`map_sharded(fn, items)` gives exactly what `fn(items)` gives on one process: each process takes a contiguous block
of `items` (accelerate's `split_between_processes`), and the blocks' results are gathered in rank order. The
per-example computations of every metric go through it, so their summaries do not depend on the process count.
Models sharded across processes (FSDP, DeepSpeed ZeRO-3) need every process in every forward pass; evaluate those
with `sharded=False`, where every process runs the full set.
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
    with state.split_between_processes(list(items)) as block:
        out = fn(list(block))
    gathered = gather_object(out)
    if len(gathered) != len(items):
        raise RuntimeError(f"Gathered {len(gathered)} results for {len(items)} items; fn must map one to one.")
    return gathered
