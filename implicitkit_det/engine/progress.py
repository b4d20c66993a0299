"""What a run shows while it works: progress bars, per-step JSON lines, and the training curves.

Progress bars run on rank 0 only, on stderr. On a terminal they refresh twice a second; when stderr is a
file or a pipe (a log), they write an update at most every 30 seconds and leave their final state, so a
log gets a readable line now and then instead of thousands of carriage returns.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..collectives import is_main_process

__all__ = ["StepLog", "plot_training_curves", "progress_bar"]


def progress_bar(
    total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, initial: int = 0
) -> tqdm:
    """A tqdm bar on rank 0 (a disabled one elsewhere, or when not `enabled`)."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not (enabled and is_main_process()),
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
        ncols=None if tty else 110,
        file=sys.stderr,
        leave=not tty,  # in a log, the bar's last state stays as one line
    )


class StepLog:
    """``steps.jsonl`` in the run folder: one JSON object per training iteration (``--log-steps``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path if is_main_process() else None

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Plot each epoch's losses (every branch's total) and AP from ``metrics.jsonl`` records into `path`.

    **Returns** the PNG's path, or None when matplotlib is not installed or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    trained = [r for r in records if "train" in r]
    if not trained:
        return None
    keys = ["loss", *sorted(k for k in trained[-1]["train"] if k.endswith("_loss"))]
    evaluated = [r for r in records if "eval" in r and "train" in r]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in trained]
    for key in keys:
        ax_loss.plot(epochs, [r["train"].get(key, float("nan")) for r in trained], marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="mean training loss", title="losses")
    ax_loss.legend(fontsize="small")
    for key in ("AP", "AP50", "AP75"):
        ax_ap.plot(
            [r["epoch"] for r in evaluated], [r["eval"][key] for r in evaluated], marker="o", label=key
        )
    ax_ap.set(xlabel="epoch", ylabel="COCO AP (val)", title="validation", ylim=(0, 1))
    ax_ap.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
