"""Collective operations over ``torch.distributed`` that also work without a process group.

Every function here falls back to the single-process answer when ``torch.distributed`` is unavailable or
not initialised, so the criterion and the evaluator can call them unconditionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "all_reduce_mean",
    "any_process",
    "broadcast_object",
    "gather_object",
    "get_rank",
    "get_world_size",
    "is_dist",
    "is_main_process",
]


def is_dist() -> bool:
    """Whether a ``torch.distributed`` process group is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank, 0 without a process group."""
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    """The number of processes, 1 without a process group."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true without a process group)."""
    return get_rank() == 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes, returned as a new tensor (the input is left unchanged).

    Arguments:
        tensor: a floating-point tensor with the same shape on every process.

    Returns:
        `sum_r tensor_r / world_size`; a copy of `tensor` without a process group.
    """
    out = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (one all-reduce; `flag` itself without a process group)."""
    if get_world_size() == 1:
        return flag
    # gloo and NCCL both reduce a float tensor on the device of the process group's backend.
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process onto every process.

    Returns:
        A list with one entry per rank, in rank order; ``[obj]`` without a process group.
    """
    if get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Gather a picklable object from every process onto rank ``dst`` only.

    Returns:
        On rank ``dst`` a list with one entry per rank, in rank order; ``None`` on the other ranks;
        ``[obj]`` without a process group.
    """
    if get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every process and return it (``obj`` itself alone)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
