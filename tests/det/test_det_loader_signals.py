"""Data-loader workers leave stop signals to the training process.

``torchrun`` and job schedulers send SIGTERM to the whole process group, and a terminal's Ctrl-C sends
SIGINT to the foreground group: the training process turns either into a clean stop with a checkpoint
(`implicitkit_det.engine.interrupt`), but a worker that took the signal died of it, and the loader then
failed the run ("DataLoader worker ... is killed by signal") before anything was saved.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from implicitkit_det.data.seeding import ignore_stop_signals


class Numbers(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.01)  # the workers are busy when the signal comes
        return torch.tensor(index)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_workers_outlive_a_stop_signal_sent_to_the_process_group(stop):
    loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    seen = [next(batches) for _ in range(2)]  # one batch from each worker: both have started
    previous = signal.signal(stop, signal.SIG_IGN)  # this process stands for the training process
    try:
        for worker in batches._workers:  # what a signal to the group does to each of them
            os.kill(worker.pid, stop)
        time.sleep(0.5)
        seen += list(batches)
    finally:
        signal.signal(stop, previous)
    assert torch.cat(seen).tolist() == list(range(64))
