"""Data-loader workers leave stop signals to the training process.

``torchrun`` and job schedulers send SIGTERM to the whole process group, and a terminal's Ctrl-C sends
SIGINT to the foreground group: the training process turns either into a clean stop with a checkpoint
(`implicitkit_det.engine.interrupt`), but a worker that took the signal died of it, and the loader then
failed the run ("DataLoader worker ... is killed by signal") before anything was saved. The workers leave
the group; the loader's own ``terminate()`` (its shutdown of a stuck worker) must still stop them.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Run in a session of its own: the signal goes to that process group, as torchrun sends it.
GROUP_SIGNAL = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from implicitkit_det.data.seeding import leave_the_process_group

class Numbers(Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, index):
        time.sleep(0.01)  # the workers are busy when the signal comes
        return torch.tensor(index)

stop = getattr(signal, sys.argv[1])
loader = DataLoader(Numbers(), batch_size=2, num_workers=2, worker_init_fn=leave_the_process_group)
batches = iter(loader)
seen = [next(batches) for _ in range(2)]  # one batch from each worker: both have started
signal.signal(stop, signal.SIG_IGN)  # this process stands for the training process, which handles it
os.killpg(os.getpgrp(), stop)
time.sleep(0.5)
seen += list(batches)
assert torch.cat(seen).tolist() == list(range(64)), "batches lost"

class Stuck(Dataset):  # a worker stuck in loading: the loader's shutdown must still end it
    def __len__(self):
        return 8
    def __getitem__(self, index):
        time.sleep(0 if index == 0 else 600)
        return torch.tensor(index)

loader = DataLoader(Stuck(), batch_size=1, num_workers=1, worker_init_fn=leave_the_process_group)
batches = iter(loader)
next(batches)
worker = batches._workers[0]
start = time.monotonic()
batches._shutdown_workers()
worker.join(timeout=30)
print("stuck worker alive after shutdown:", worker.is_alive(), f"{time.monotonic() - start:.0f}s")
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_workers_outlive_a_stop_signal_to_the_process_group_and_still_shut_down(stop):
    done = subprocess.run(
        [sys.executable, "-c", GROUP_SIGNAL, stop],
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stuck worker alive after shutdown: False" in done.stdout
