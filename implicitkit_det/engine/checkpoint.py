"""Checkpoint dicts, written by rank 0 atomically, and resuming from them.

The dict holds ``model``, ``optimizer``, ``scheduler`` (state dicts), ``epoch`` (the epoch of the last
iteration run), ``config`` (what rebuilds the model: config name, number of classes, overrides), ``args``
(the run's settings, as a dict), plus ``scaler`` (the AMP gradient scaler) and ``rng`` (the random
generators: one state, or a list with one per process), and whatever else the caller adds (the training
loop adds ``progress``: the position in the epoch, so that a resumed run continues exactly as if it had
never stopped).

A run folder holds ``checkpoint_last.pth`` (:data:`LAST`), ``checkpoint_best.pth`` (:data:`BEST`) and,
when asked for, ``checkpoint_epoch{N}.pth``; :func:`resolve_checkpoint` turns a folder into its last one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..collectives import get_rank, is_main_process
from .process_group import unwrap

__all__ = [
    "BEST",
    "LAST",
    "copy_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "remove_stale_temporaries",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

LAST, BEST, LEGACY = "checkpoint_last.pth", "checkpoint_best.pth", "checkpoint.pth"


def rng_state() -> dict[str, Any]:
    """This process's random state: torch's CPU (and every CUDA device's), Python's and NumPy's.

    Python's and NumPy's are kept as plain lists so that the checkpoint loads with ``weights_only=True``.
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file `path` names: a file itself, or a run folder's :data:`LAST` (or older runs'
    ``checkpoint.pth``)."""
    path = Path(path)
    if path.is_dir():
        for name in (LAST, LEGACY):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"{path} holds no {LAST}; pass a run folder that a training run wrote (its --output-dir), or a "
            "checkpoint file"
        )
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a write killed half-way left in `folder` (``.checkpoint*.tmp``)."""
    stale = sorted(Path(folder).glob(".checkpoint*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _atomic(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a checkpoint file atomically (what keeps the best and every k-th epoch's)."""
    target = Path(target)
    _atomic(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    config: dict[str, Any],
    args: dict[str, Any],
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Write the checkpoint on rank 0 (other ranks return None without writing).

    The file is written under a temporary name in the same folder and renamed into place, so a run killed
    while saving leaves the previous checkpoint intact. `config` and `args` should hold plain values
    (numbers, strings, lists, dicts) so that the file loads with ``torch.load(weights_only=True)``.
    `extra` entries are added to the dict (an ``rng`` entry there replaces this process's state).
    """
    if not is_main_process():
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": epoch,
        "config": config,
        "args": args,
        "rng": rng_state(),
        **(extra or {}),
    }
    _atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def read_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint file (or a run folder's last) onto the CPU, with errors that name the file and the fix;
    `mmap` maps the file instead of reading it (for a look at its position, not its weights)."""
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the run folder (--output-dir) of a training run, or "
            f"its {LAST}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"cannot read checkpoint {path} ({why}): pass a run folder or a checkpoint_*.pth that training wrote"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state


def load_checkpoint(
    checkpoint: str | os.PathLike | dict[str, Any],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = False,
) -> dict[str, Any]:
    """Read a checkpoint and load it into whichever of the objects are given.

    Arguments:
        checkpoint: a file written by :func:`save_checkpoint`, or the dict :func:`read_checkpoint` read.
        model, optimizer, scheduler, scaler: loaded in place when given (the model may be wrapped
            in DDP). The model must match exactly (``strict=True``).
        restore_rng: also restore the random generators (a list of states: this process's rank's).

    Returns:
        The whole dict (``epoch``, ``config``, ``args``, ...).
    """
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    if model is not None:
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as err:
            config = state.get("config", {})
            raise RuntimeError(
                "the checkpoint does not fit the model built for this run (it was saved with config "
                f"{config}); use the same --config and data (number of classes). Details: {err}"
            ) from err
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and state.get("rng") is not None:
        rng = state["rng"]
        set_rng_state(rng[get_rank()] if isinstance(rng, list) else rng)
    return state
