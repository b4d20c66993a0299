"""The process group's lifecycle: joining it from ``torchrun``'s environment, leaving it, samplers, DDP.

``torchrun --nproc_per_node=K ...`` starts K processes and gives each ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed` reads them; without them the
run is a single process and every helper here (and in :mod:`implicitkit_det.collectives`) gives the
single-process answer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..collectives import get_rank, get_world_size, is_dist

__all__ = [
    "DealtBatches",
    "DistInfo",
    "broadcast_buffers",
    "build_sampler",
    "cleanup_distributed",
    "init_distributed",
    "per_process_batch_norms",
    "unwrap",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its rank, the number of processes, its local rank and device.

    Whether this process is rank 0 has one answer: :func:`implicitkit_det.collectives.is_main_process`.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group that ``torchrun`` describes, or stay single-process.

    Arguments:
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). Under ``torchrun`` each process
            takes GPU ``LOCAL_RANK``.

    Returns:
        A :class:`DistInfo`. The backend is NCCL for CUDA and gloo for the CPU. A ``WORLD_SIZE``
        of 1 (``torchrun --nproc_per_node=1``) still forms a group, so the code path matches a larger run.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {kind} was asked for but CUDA is not available here; use --device cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device(kind))
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if kind.startswith("cuda"):
        if local >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible; "
                "start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device(kind)
    if not is_dist():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(rank, world, local, dev)


def cleanup_distributed() -> None:
    """Leave the process group, if any (a no-op for a single process)."""
    if is_dist():
        dist.destroy_process_group()


def build_sampler(dataset: Dataset, *, shuffle: bool, seed: int = 0) -> DistributedSampler:
    """A ``DistributedSampler`` over this process's share of `dataset` (all of it for one process).

    Used for a single process too, so that the order of every epoch depends only on ``(seed, epoch)``:
    call ``sampler.set_epoch(epoch)`` before each epoch. With ``drop_last=False`` (used here), when the
    dataset does not divide evenly the sampler repeats the first samples so that every process gets
    ``ceil(len / world_size)`` samples, hence the same number of batches, which DDP's collective
    operations need: a handful of images are seen twice per epoch. (Evaluation reads through
    :class:`DealtBatches` instead.)
    """
    return DistributedSampler(
        dataset,
        num_replicas=get_world_size(),
        rank=get_rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=False,
    )


class DealtBatches(Sampler[list[int]]):
    """Evaluation batches formed in the dataset's order, as one process forms them, dealt to the processes
    in turn: process ``r`` of ``W`` gets batches ``r, r + W, ...``.

    A detection depends on its batch through the padding to the batch's largest image (the backbone's
    normalisation layers give padded pixels a value), so batches formed the same way at any number of
    processes give the same detections, hence the same AP. Every image is in one batch exactly; the
    processes may get one batch more or less than each other (evaluation runs no collective per batch).
    """

    def __init__(self, size: int, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size = get_rank(), get_world_size()

    def _batches(self) -> range:
        return range(self.rank, math.ceil(self.size / self.batch_size), self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches():
            yield list(range(b * self.batch_size, min((b + 1) * self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(self._batches())


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm's running statistics): a process updates its own in
    each training forward after DDP's broadcast, so they differ by the last step when evaluation starts."""
    if is_dist():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def per_process_batch_norms(model: nn.Module) -> int:
    """How many trained ``BatchNorm`` layers `model` has (plain ones; frozen-statistics subclasses and frozen
    stages aside). Under DDP each normalises over its own process's batch, not the total one: SyncBatchNorm
    would share the statistics, but it runs on CUDA only, and is not applied here."""
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return sum(type(m) in plain and (m.weight is None or m.weight.requires_grad) for m in model.modules())


def wrap_ddp(model: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap `model` in ``DistributedDataParallel`` when there is a process group, else return it.

    `find_unused_parameters` costs a graph traversal per iteration; it is only needed when some trainable
    parameters get no gradient in an iteration (DDP then stops with an error that says so).
    """
    if not is_dist():
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
