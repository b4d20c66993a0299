"""Ctrl-C during training: finish the iteration, save a checkpoint, say how to resume.

:class:`StopRequest` is active while :func:`~implicitkit_det.engine.run.fit` trains. The first SIGINT (or
SIGTERM, what schedulers and ``torchrun`` send) only sets a flag; the training loop votes it into the
iteration's all-reduce, so that every process stops after the same iteration, saves there and raises
:class:`TrainingInterrupted`. A second SIGINT stops at once, without saving.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from ..collectives import get_world_size, is_main_process

__all__ = ["INTERRUPT_AT_ENV", "StopRequest", "TrainingInterrupted"]

#: For tests: ``"EPOCH:ITERATION"`` makes rank 0 send itself SIGINT after that iteration (0-based), as a
#: Ctrl-C would; ``"EPOCH:ITERATION:launcher"`` sends it to the parent process instead (``torchrun``, which
#: forwards it to every process, as it does a Ctrl-C in its terminal); ``"EPOCH:ITERATION:group-term"`` sends
#: SIGTERM to its whole process group, data workers included, as a scheduler stopping a job does;
#: ``"EPOCH:ITERATION:kill"`` sends itself SIGKILL (a crash: nothing is saved).
INTERRUPT_AT_ENV = "IMPLICITKIT_DET_INTERRUPT_AT"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request; `checkpoint` holds the state to resume from."""

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class StopRequest:
    """A context manager that turns SIGINT / SIGTERM into a flag (:attr:`requested`) while it is active."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._hook = _test_hook()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True
        if is_main_process():
            when = (
                "this iteration"
                if get_world_size() == 1
                else "the next iteration (every process stops together)"
            )
            print(
                f"\n{signal.Signals(signum).name}: stopping after {when} to save a checkpoint "
                "(Ctrl-C again to stop at once, without saving)",
                file=sys.stderr,
                flush=True,
            )

    def after_iteration(self, epoch: int, iteration: int, rank: int) -> None:
        """The test hook: rank 0 signals itself after the iteration :data:`INTERRUPT_AT_ENV` names."""
        if self._hook is None or self._hook[:2] != (epoch, iteration) or rank != 0:
            return
        if self._hook[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hook[2] == "group-term":
            os.killpg(os.getpgrp(), signal.SIGTERM)
        else:
            os.kill(os.getppid() if self._hook[2] == "launcher" else os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 30
        while not self.requested and time.monotonic() < deadline:  # the launcher forwards it: wait for it
            time.sleep(0.01)


def _test_hook() -> tuple[int, int, str] | None:
    text = os.environ.get(INTERRUPT_AT_ENV)
    if not text:
        return None
    epoch, iteration, *target = text.split(":")
    return int(epoch), int(iteration), "".join(target)
