"""Training batches whose augmentation depends only on (seed, epoch, image), and that can start mid-epoch.

A resumed run must draw the same random crops and scales as the run it continues. DataLoader workers keep
their own random state, which depends on the history of the process (persistent workers carry it from
epoch to epoch; fresh ones are seeded from the main process's generator), so that state cannot be
restored. Instead every sample gets its own seed, a function of ``(seed, epoch, dataset index)``:
:class:`EpochBatches` yields ``(index, sample_seed)`` pairs and :class:`SeededSamples` loads each sample
with the random generators seeded from it, then restores them. The augmentation of an iteration is then a
function of the iteration alone, whatever the number of workers.

:meth:`EpochBatches.set_epoch` also takes the first batch to yield: a resumed run skips the batches an
interrupted epoch consumed without loading them.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["EpochBatches", "SeededSamples", "leave_the_process_group", "sample_seed"]

_MASK = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of dataset item `index` in `epoch` of a run seeded with `seed`."""
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) & _MASK


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """The batches of one epoch of `batch_sampler`, each index paired with its :func:`sample_seed`.

    Arguments:
        batch_sampler: yields lists of dataset indices; its ``set_epoch`` (or its sampler's) reshuffles.
        seed: the run's seed.

    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, batch_sampler: Any, seed: int) -> None:
        self.batch_sampler, self.seed = batch_sampler, seed
        self.epoch, self.start, self.stop = 0, 0, None

    def set_epoch(self, epoch: int, start: int = 0, stop: int | None = None) -> None:
        """Yield the batches ``start .. stop - 1`` of `epoch`'s order (the index lists of the earlier ones
        are computed, their images never loaded)."""
        target = (
            self.batch_sampler if hasattr(self.batch_sampler, "set_epoch") else self.batch_sampler.sampler
        )
        target.set_epoch(epoch)
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for k, batch in enumerate(self.batch_sampler):
            if self.stop is not None and k >= self.stop:
                return
            if k >= self.start:
                yield [(i, sample_seed(self.seed, self.epoch, i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    # The CPU generator alone, which the transforms draw from: torch.manual_seed would also queue the seed
    # for every accelerator, formatting a stack trace each time (a third of the digits set's loading time).
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)


class SeededSamples(Dataset):
    """`dataset` indexed by ``(index, seed)``: the item loaded with torch's and Python's generators seeded
    from `seed` (and restored afterwards, so that loading in the main process draws nothing from them)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _seeded(seed):
            return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def leave_the_process_group(_worker_id: int) -> None:
    """A DataLoader ``worker_init_fn``: the worker moves to a process group of its own.

    A terminal's Ctrl-C (SIGINT), ``torchrun`` and job schedulers (SIGTERM) signal the training process's
    whole group; the training process turns either into a clean stop with a checkpoint and then shuts its
    workers down, but a worker that took the signal died of it and failed the run before it saved. Out of
    the group the workers miss those signals, and still answer the loader's own ``terminate()``.
    """
    if hasattr(os, "setpgrp"):  # POSIX
        os.setpgrp()
