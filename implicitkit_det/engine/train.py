"""One training epoch: forward and backward (branch-wise by default), clipped AdamW step, per-iteration schedule.

The model follows the torchvision convention: in training mode ``model(images, targets, mask=mask)``
returns a dict of scalar losses whose ``"loss"`` entry is the total to minimise. A model with several
supervised branches (DEQDet) sums them into ``"loss"`` itself.

The detectors (:class:`~implicitkit_det.models.QueryDetector`) train branch-wise by default:
``model(images, targets, mask=mask, branchwise=True)`` back-propagates each branch group as soon as its
loss exists and returns, beside the losses, one backward that delivers the whole gradient. That
last backward is the only one ``DistributedDataParallel`` synchronises, so there is one gradient reduction
per iteration, as with one backward of the total. Other models, and ``branchwise=False``, get one backward
of ``"loss"``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..collectives import all_reduce_mean, is_main_process
from ..data import DetectionBatch
from ..models.detector import BranchwiseLosses, QueryDetector
from .process_group import unwrap
from .progress import progress_bar

__all__ = [
    "EpochMeter",
    "NonFiniteLossError",
    "StepResult",
    "autocast",
    "forward_train",
    "headline",
    "make_grad_scaler",
    "progress_line",
    "train_one_epoch",
    "train_step",
    "trains_branchwise",
]


class NonFiniteLossError(FloatingPointError):
    """The total loss became NaN or infinite; training cannot go on from here."""


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass: bfloat16 on the CPU, float16 on CUDA (a no-op if disabled)."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for float16 autocast (CUDA); bfloat16 needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")


def trains_branchwise(model: nn.Module) -> bool:
    """Whether `model` (plain or wrapped in DDP) offers branch-wise training: a ``QueryDetector``."""
    return isinstance(unwrap(model), QueryDetector)


def forward_train(
    model: nn.Module,
    batch: DetectionBatch,
    *,
    branchwise: bool = False,
    loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``model(images, targets, mask=mask)`` in training mode, checked to be a dict of losses.

    With `branchwise` the model is called with ``branchwise=True, loss_scale=loss_scale`` (see
    :meth:`~implicitkit_det.models.QueryDetector.forward`): the branches are back-propagated already.

    Returns:
        ``(losses, pending)``: the dict, and the backward left to run (branch-wise) or None.
    """
    pending = None
    if branchwise:
        result = model(batch.images, batch.targets, mask=batch.mask, branchwise=True, loss_scale=loss_scale)
        if not isinstance(result, BranchwiseLosses):
            raise TypeError(
                f"a branch-wise training call returned {type(result).__name__}, not BranchwiseLosses"
            )
        losses, pending = result.losses, result.pending
    else:
        losses = model(batch.images, batch.targets, mask=batch.mask)
    if not isinstance(losses, Mapping) or "loss" not in losses:
        raise TypeError(
            f"in training mode the model returned {type(losses).__name__}; the engine needs a dict of scalar "
            "loss tensors with the total under 'loss' (torchvision's convention). Is the model in train mode?"
        )
    return dict(losses), pending


def _scalar_entries(losses: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # Everything scalar is logged: the losses and any per-iteration statistic the model adds.
    return {
        k: v.detach().float().reshape(())
        for k, v in losses.items()
        if isinstance(v, torch.Tensor) and v.numel() == 1
    }


def headline(values: Mapping[str, float]) -> dict[str, float]:
    """The entries worth a progress line: the total, each branch's total and any unprefixed raw term.

    A multi-branch model reports ``{branch}_{term}`` for every term of every branch; the line shows
    ``{branch}`` totals (from ``{branch}_loss``) and leaves the rest to the metrics file.
    """
    out = {"loss": values["loss"]} if "loss" in values else {}
    for k, v in values.items():
        if k.endswith("_loss"):
            out[k[: -len("_loss")]] = v
        elif k in ("focal", "l1", "giou"):
            out[k] = v
    return out


def _format(values: Mapping[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in values.items())


@dataclass
class StepResult:
    """One iteration's outcome: the scalar entries averaged over processes, the gradient norm before
    clipping (infinite or NaN where a float16 ``GradScaler`` skipped the step), the learning rate the step
    used (the first parameter group's), and whether any process asked to stop (:func:`train_step`'s
    `stop_vote`)."""

    losses: dict[str, float]
    grad_norm: float
    lr: float = math.nan
    stop: bool = False


@dataclass
class EpochMeter:
    """Running sums of an epoch's :class:`StepResult` (a checkpoint saves them via :meth:`state`)."""

    sums: dict[str, float] = field(default_factory=dict)
    grad_norm_sum: float = 0.0
    iters: int = 0
    time_s: float = 0.0
    lr: float = math.nan
    skipped_steps: int = 0

    def add(self, result: StepResult) -> None:
        self.iters += 1
        if math.isfinite(result.grad_norm):
            self.grad_norm_sum += result.grad_norm
        else:  # a step the float16 GradScaler skipped: counted, not averaged in (it would make the mean inf)
            self.skipped_steps += 1
        self.lr = result.lr
        for k, v in result.losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state(self) -> dict[str, Any]:
        return {
            "sums": dict(self.sums),
            "grad_norm_sum": self.grad_norm_sum,
            "iters": self.iters,
            "time_s": self.time_s,
            "lr": self.lr,
            "skipped_steps": self.skipped_steps,
        }

    def stats(self, lr: float) -> dict[str, float]:
        """The epoch's averages of every logged entry, and ``lr`` (the rate of its last step; `lr` when it has
        none), ``grad_norm`` (the mean over the steps with a finite one), ``iters``, ``time_s`` and, when a
        float16 ``GradScaler`` skipped any, ``skipped_steps``."""
        out = {k: v / max(self.iters, 1) for k, v in self.sums.items()}
        counted = max(self.iters - self.skipped_steps, 1)
        out.update(
            lr=lr if math.isnan(self.lr) else self.lr,
            grad_norm=self.grad_norm_sum / counted,
            iters=self.iters,
            time_s=self.time_s,
        )
        if self.skipped_steps:
            out["skipped_steps"] = self.skipped_steps
        return out


def train_step(
    model: nn.Module,
    batch: DetectionBatch,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    iteration: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    clip_max_norm: float | None = 1.0,
    branchwise: bool = True,
    stop_vote: bool = False,
) -> StepResult:
    """One training iteration; `model` must be in train mode.

    Forward under :func:`autocast`, which in branch-wise training also back-propagates every branch group
    (each loss scaled by `scaler`); the scalar entries of the loss dict averaged over processes (one
    all-reduce, which also carries `stop_vote`: the result's ``stop`` is true on every process as soon as one
    of them voted) for logging and for the NaN check, so that every process sees the same values and stops
    together; the backward of ``"loss"``, or the pending backward that delivers the gathered gradients
    (branch-wise), the one DDP synchronises; unscaling, clipping of the total gradient to a 2-norm of
    `clip_max_norm` (None or 0: off); the optimizer step; ``scheduler.step()`` (it counts iterations).

    Returns:
        The :class:`StepResult`. Raises :class:`NonFiniteLossError` when the averaged total loss is NaN or
        infinite, before the (last) backward pass and the step, naming the epoch, the iteration and every
        loss entry.
    """
    branchwise = branchwise and trains_branchwise(model)
    scaler = scaler if scaler is not None and scaler.is_enabled() else None
    loss_scale = scaler.scale if scaler is not None else None
    batch = batch.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)  # before the forward: branch-wise, it back-propagates
    try:
        with autocast(device, amp):
            losses, pending = forward_train(model, batch, branchwise=branchwise, loss_scale=loss_scale)
    except FloatingPointError as err:  # e.g. the matcher meeting NaN predictions
        raise NonFiniteLossError(
            f"non-finite values in the forward pass at epoch {epoch}, iteration {iteration}: {err}"
        ) from err
    reduced, stop = _reduce(_scalar_entries(losses), stop_vote, epoch, iteration)
    if pending is not None:
        pending.backward()  # the gathered gradients, already scaled
    elif scaler is not None:
        scaler.scale(losses["loss"]).backward()
    else:
        losses["loss"].backward()
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses, before the scheduler moves it
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = _clip(model, clip_max_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        grad_norm = _clip(model, clip_max_norm)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(reduced, grad_norm, lr=lr, stop=stop)


def _reduce(
    logged: dict[str, torch.Tensor], stop_vote: bool, epoch: int, iteration: int
) -> tuple[dict[str, float], bool]:
    """The entries averaged over processes and whether any process voted to stop, in one all-reduce (stacked
    in sorted order so that every process agrees on the layout); refuses a non-finite total."""
    keys = sorted(logged)
    vote = torch.tensor(float(stop_vote), device=logged[keys[0]].device)
    reduced_all = all_reduce_mean(torch.stack([*(logged[k] for k in keys), vote])).tolist()
    means = dict(zip(keys, reduced_all[:-1], strict=True))
    reduced = {k: means[k] for k in logged}
    if not math.isfinite(reduced["loss"]):
        raise NonFiniteLossError(
            f"the loss is {reduced['loss']} at epoch {epoch}, iteration {iteration} (averaged over processes); "
            f"losses: {_format(reduced)}. The run has diverged: lower the learning rate (--lr), keep "
            "gradient clipping on, try without --amp, and resume from the last checkpoint (--resume)."
        )
    return reduced, reduced_all[-1] > 0


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[DetectionBatch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    clip_max_norm: float | None = 1.0,
    max_iters: int | None = None,
    print_freq: int = 20,
    log: Callable[[str], None] = print,
    branchwise: bool = True,
    start: int = 0,
    meter: EpochMeter | None = None,
    stop_vote: Callable[[], bool] | None = None,
    on_step: Callable[[int, StepResult], None] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Train for one pass over `loader` (or up to iteration `max_iters`), one :func:`train_step` per batch.

    The one epoch loop: :func:`~implicitkit_det.engine.run.fit` runs it too, starting mid-epoch on resume
    (`start`, `meter`) and stopping on Ctrl-C (`stop_vote`, `on_step`).

    Arguments:
        model, optimizer, scheduler, device, epoch, amp, scaler, clip_max_norm, branchwise: of
            :func:`train_step` (the model is set to training mode here).
        loader: yields :class:`~implicitkit_det.data.DetectionBatch`, from iteration `start` on.
        max_iters: the iteration (counted from the epoch's start) to stop before.
        print_freq, log: a progress line every `print_freq` iterations, on rank 0.
        start: the index of the loader's first batch in the epoch (a resumed epoch's position).
        meter: the running sums to continue (a resumed epoch's); updated in place, time included.
        stop_vote: asked before each step whether this process wants to stop (see :func:`train_step`).
        on_step: called as ``on_step(i, result)`` after each iteration, the meter already updated.
        progress: a progress bar on rank 0.

    Returns:
        The epoch's averages of every logged entry (over iterations and processes), and ``lr`` (the first
        group's, as its last step used it), ``grad_norm`` (mean, before clipping), ``iters``, ``time_s``.
    """
    model.train()
    meter = meter if meter is not None else EpochMeter()
    total = _epoch_length(loader, max_iters)
    started = time.perf_counter() - meter.time_s
    with progress_bar(total, f"epoch {epoch}", initial=start, enabled=progress) as bar:
        for i, batch in enumerate(loader, start=start):
            if max_iters is not None and i >= max_iters:
                break
            result = train_step(
                model, batch, optimizer, device=device, epoch=epoch, iteration=i, scheduler=scheduler, amp=amp,
                scaler=scaler, clip_max_norm=clip_max_norm, branchwise=branchwise,
                stop_vote=stop_vote() if stop_vote is not None else False,
            )  # fmt: skip
            meter.add(result)
            meter.time_s = time.perf_counter() - started
            _show_step(bar, result)
            if is_main_process() and print_freq and (i % print_freq == 0 or i + 1 == total):
                log(progress_line(epoch, i, total, result, meter.time_s))
            if on_step is not None:
                on_step(i, result)
    if meter.iters == 0:
        raise ValueError(
            f"epoch {epoch} ran no iterations: the training loader is empty (is the dataset empty, or "
            "--max-iters 0?)"
        )
    return meter.stats(optimizer.param_groups[0]["lr"])


def _epoch_length(loader: Iterable[DetectionBatch], max_iters: int | None) -> int | None:
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if total is not None and max_iters is not None:
        total = min(total, max_iters)
    return total


def _show_step(bar: Any, result: StepResult) -> None:
    bar.set_postfix(loss=f"{result.losses['loss']:.4f}", lr=f"{result.lr:.3g}", refresh=False)
    bar.update(1)


def progress_line(
    epoch: int,
    i: int,
    total: int | None,
    result: StepResult,
    elapsed: float,
) -> str:
    """``epoch E [i/total] lr ...  loss ...  grad_norm ...  Ts``: one iteration's summary (``lr``: the rate the
    step used)."""
    return (
        f"epoch {epoch} [{i + 1}/{total if total is not None else '?'}] lr {result.lr:.3g}  "
        f"{_format(headline(result.losses))}  grad_norm {result.grad_norm:.3f}  {elapsed:.1f}s"
    )


def _clip(model: nn.Module, max_norm: float | None) -> float:
    """Clip gradients to `max_norm` (when set) and return their total 2-norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
