"""What a run shows: the banner of its settings, progress bars, per-step JSON lines, the training curves.

Progress bars run on rank 0 only, on stderr. On a terminal they refresh twice a second; when stderr is a
file or a pipe (a log), they write an update at most every 30 seconds and leave their final state, so a
log gets a readable line now and then instead of thousands of carriage returns.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from tqdm import tqdm

from ..collectives import is_main_process
from ..models.detector import QueryDetector
from .checkpoint import BEST, LAST
from .process_group import unwrap

if TYPE_CHECKING:
    from .process_group import DistInfo
    from .run_config import RunConfig
    from .run_setup import RunData

__all__ = [
    "RunPosition",
    "StepLog",
    "evaluation_banner",
    "plot_training_curves",
    "progress_bar",
    "training_banner",
]


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


def rewind_jsonl(path: Path, keep: Callable[[Mapping[str, Any]], bool]) -> int:
    """Drop the records of the JSON-lines file `path` that `keep` refuses, and any line cut short by a crash;
    returns how many were dropped. For a resumed run: what was logged after its checkpoint's position, before
    the run stopped, is logged again as the run trains on from there."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and _kept(line, keep)]
    if len(kept) != len(lines):
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, path)  # atomic: a crash now leaves the old file or the new one
    return len(lines) - len(kept)


def _kept(line: str, keep: Callable[[Mapping[str, Any]], bool]) -> bool:
    try:
        return keep(json.loads(line))
    except ValueError:  # a line cut short
        return False


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Plot each epoch's losses (every branch's total) and AP from ``metrics.jsonl`` records into `path`.

    Returns:
        The PNG's path, or None when matplotlib is not installed or there is nothing to plot.
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


@dataclass
class RunPosition:
    """What the training banner tells beyond the settings: the optimiser's groups and base learning rates,
    the epoch's length and where a resumed run starts."""

    groups: list[dict[str, Any]]
    base_lrs: list[float]
    iters_per_epoch: int
    epoch: int = 0
    iteration: int = 0


def evaluation_banner(cfg: RunConfig, data: RunData, model: nn.Module, info: DistInfo) -> str:
    """The settings an ``--eval-only`` run prints before it starts."""
    return "evaluation only\n" + _lines(
        {**_run_summary(cfg, data, model, info), "checkpoint": cfg.resumed_from}
    )


def training_banner(cfg: RunConfig, data: RunData, model: nn.Module, info: DistInfo, at: RunPosition) -> str:
    """The settings a training run prints before it starts (or resumes at `at`)."""
    train = data.train
    assert train is not None
    schedule = cfg.lr_schedule()
    summary = _run_summary(cfg, data, model, info)
    summary.update(
        {
            "train images": f"{len(train)} ({at.iters_per_epoch} iterations/epoch, batch {cfg.batch_size} x "
            f"{info.world_size}{'' if cfg.no_aspect_grouping else ', grouped by aspect ratio'}; "
            f"{train.removed_empty} without boxes left out)",
            "schedule": f"{cfg.schedule}: {schedule.epochs} epochs, lr x{schedule.gamma} at epochs "
            f"{list(schedule.drops)} (once per entry), {schedule.warmup_iters} warm-up iterations",
            "optimizer": "AdamW: "
            + ", ".join(
                f"{g['name']} lr {lr:.3g} wd {g['weight_decay']:.3g}"
                for g, lr in zip(at.groups, at.base_lrs, strict=True)
            ),
            "clip": cfg.clip_max_norm or "off",
            "backward": "one graph" if cfg.one_graph_backward else "branch-wise",
            "evaluation": f"every {cfg.eval_every} epoch(s) and after the last",
            "checkpoints": _checkpoint_plan(cfg),
            "image check": "skipped (--skip-image-check)"
            if cfg.skip_image_check
            else "every image opened before training",
        }
    )
    if cfg.resumed_from is not None:
        where = f"epoch {at.epoch}, iteration {at.iteration}/{at.iters_per_epoch}"
        summary["resumed"] = f"{cfg.resumed_from} ({where})"
    if cfg.changed:
        summary["changed on resume"] = ", ".join(
            f"{k} {old} -> {new}" for k, (old, new) in cfg.changed.items()
        )
    return "training\n" + _lines(summary)


def _checkpoint_plan(cfg: RunConfig) -> str:
    return (
        f"{LAST} every epoch"
        + (f" and every {cfg.checkpoint_every} iterations" if cfg.checkpoint_every else "")
        + f", {BEST} by AP"
        + (f", checkpoint_epoch<N>.pth every {cfg.keep_every} epochs" if cfg.keep_every else "")
    )


def _lines(items: dict[str, Any]) -> str:
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())


def _run_summary(cfg: RunConfig, data: RunData, model: nn.Module, info: DistInfo) -> dict[str, Any]:
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    inner = unwrap(model)
    out = {
        "config": f"{cfg.config} {dict(cfg.overrides) or ''}".strip(),
        "parameters": f"{n_params / 1e6:.2f} M ({n_trainable / 1e6:.2f} M trainable)",
        "data": f"{'bundled digits set' if data.paths.digits else 'COCO-format'}: {data.paths.val_ann.parent.parent}",
        "classes": data.val.num_classes,
        "input size": f"shorter side {cfg.image_size}, longer side at most {cfg.max_size}",
        "val images": f"{len(data.val)} (batch {cfg.eval_batch_size or (cfg.batch_size if data.paths.digits else 1)})",
        "workers": cfg.workers,
        "device": f"{info.device} x {info.world_size} process(es)",
        "amp": ("backbone, neck and decoder" if cfg.amp_decoder else "backbone and neck")
        if cfg.amp
        else "off",
        "seed": cfg.seed,
        "output": cfg.output_dir,
    }
    test = inner.test_settings if isinstance(inner, QueryDetector) else {}
    if "test_steps" in test:
        tol = test.get("test_tol")
        exit_rule = f", early exit at tol {tol} ({test['test_solver']})" if tol is not None else ""
        out["test steps"] = f"{test['test_steps']}{exit_rule}"
    return out
