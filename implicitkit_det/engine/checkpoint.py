"""One checkpoint dict per run, written by rank 0 atomically, and resuming from it.

The dict holds ``model``, ``optimizer``, ``scheduler`` (state dicts), ``epoch`` (the last finished
epoch), ``config`` (what rebuilds the model: config name, number of classes, overrides), ``args`` (the
command line, as a dict), plus ``scaler`` (the AMP gradient scaler) and ``rng`` (the random generators),
so that a resumed single-process run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import is_main_process
from .distributed import unwrap

__all__ = ["load_checkpoint", "read_checkpoint", "rng_state", "save_checkpoint", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """The CPU (and, when present, every CUDA device's) torch random state."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
) -> Path | None:
    """Write the checkpoint on rank 0 (other ranks return None without writing).

    The file is written under a temporary name in the same folder and renamed into place, so a run killed
    while saving leaves the previous checkpoint intact. `config` and `args` should hold plain values
    (numbers, strings, lists, dicts) so that the file loads with ``torch.load(weights_only=True)``.
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
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file onto the CPU, with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the checkpoint.pth file that a training run wrote "
            "into its --output-dir"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path} ({err}); is it a file this project wrote?") from err
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

    **Arguments**
    - `checkpoint`: a file written by :func:`save_checkpoint`, or the dict :func:`read_checkpoint` read.
    - `model`, `optimizer`, `scheduler`, `scaler`: loaded in place when given (the model may be wrapped
      in DDP). The model must match exactly (``strict=True``).
    - `restore_rng`: also restore the random generators (exact continuation of a single-process run).

    **Returns** the whole dict (``epoch``, ``config``, ``args``, ...).
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
        set_rng_state(state["rng"])
    return state
