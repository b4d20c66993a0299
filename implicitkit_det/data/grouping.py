"""Batches of images with similar aspect ratios, so that padding a batch to one size wastes little."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

__all__ = ["GroupedBatchSampler", "aspect_ratio_groups"]


def aspect_ratio_groups(aspect_ratios: Sequence[float], bins: Sequence[float] = (1.0,)) -> list[int]:
    """The group of each image: the index of the first bin edge its ``width / height`` does not exceed.

    With the default edge ``1.0`` there are two groups, as in mmdetection's ``GroupSampler`` (the
    official DEQDet and AdaMixer runs): tall or square images (``w / h <= 1``) in group 0, wide ones in
    group 1. More edges give finer groups, e.g. ``(0.5, 0.75, 1.0, 1.33, 2.0)``.

    Arguments:
        aspect_ratios: ``width / height`` per image.
        bins: increasing edges.

    Returns:
        One group id in ``0 .. len(bins)`` per image.
    """
    edges = list(bins)
    if edges != sorted(edges):
        raise ValueError(f"bins must be increasing, got {edges}")
    return [bisect.bisect_left(edges, r) for r in aspect_ratios]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batch the indices of `sampler` so that each batch holds images of one group.

    Indices are taken in the sampler's order and kept in one buffer per group; a buffer that reaches
    `batch_size` is yielded as a batch. At the end the leftovers of all groups (fewer than `batch_size`
    each) are yielded in the sampler's order, in batches of `batch_size` (the last possibly smaller). So
    every index of the sampler appears exactly once per epoch, and there are always
    ``ceil(len(sampler) / batch_size)`` batches: under ``DistributedSampler``, which gives every process
    the same number of indices, every process runs the same number of iterations, as DDP needs.

    The order depends only on the sampler's: with a ``DistributedSampler``, on ``(seed, epoch)``; call
    :meth:`set_epoch` (forwarded to the sampler) before each epoch.

    Arguments:
        sampler: yields dataset indices (e.g. :func:`~implicitkit_det.engine.process_group.build_sampler`).
        group_ids: the group of every dataset index (:func:`aspect_ratio_groups`).
        batch_size: images per batch.
    """

    def __init__(self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler, self.group_ids, self.batch_size = sampler, list(group_ids), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[tuple[int, int]]] = {}  # group -> [(position in the sampler, index)]
        for position, index in enumerate(self.sampler):
            buffer = buffers.setdefault(self.group_ids[index], [])
            buffer.append((position, index))
            if len(buffer) == self.batch_size:
                yield [i for _, i in buffer]
                buffer.clear()
        leftovers = [i for _, i in sorted(item for b in buffers.values() for item in b)]
        for start in range(0, len(leftovers), self.batch_size):
            yield leftovers[start : start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the sampler (``DistributedSampler.set_epoch``), which reshuffles."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
