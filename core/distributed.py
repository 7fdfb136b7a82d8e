"""Multi-process runs under `torchrun`: rank/world from the environment, a gloo (CPU) or NCCL (GPU) process group,
and the few collectives the pipeline needs. With one process every helper is a no-op.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available (under torchrun: this process's GPU, set by `init`), else cpu; any other torch
    device name as it is."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init() -> None:
    """Join the process group torchrun set up (no-op for a single process)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def close() -> None:
    if world_size() == 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() == 1:
        return
    import torch.distributed as dist

    dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item starting at its rank (deterministic)."""
    return list(items[rank()::world_size()])


def gather_shards(local: list[Any], total: int) -> list[Any]:
    """Inverse of `shard`: every rank gets the full list, in the original order."""
    if world_size() == 1:
        return local
    import torch.distributed as dist

    parts: list[list[Any] | None] = [None] * world_size()
    dist.all_gather_object(parts, local)
    out: list[Any] = [None] * total
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out


def average_gradients(params) -> None:
    """Mean of every parameter's gradient over the ranks (data-parallel training on equal shards)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()
