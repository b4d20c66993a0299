"""The one loop every solver runs in: per-sample stopping, best and last iterate, failure codes.

What the loop keeps per step (residuals, which samples were active) goes into buffers allocated once for
``max_iter`` steps: small tensors kept alive between large per-step temporaries fragment the CPU heap, and
then a process's memory grows with the step count even though nothing large is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..stats import FixedPointError, Result, SolverStats

if TYPE_CHECKING:
    from .base import Solver

FlatMap = Callable[[Tensor], Tensor]
FlatPerturbation = Callable[[Tensor, int], Tensor]

# Keeps the relative residual finite at a fixed point of (near) zero norm.
_REL_EPS = 1e-8


@dataclass
class SolveResult:
    """Flat output of :func:`iterate`, all ``[B, D]``: the best and the last iterate, stats, captured states."""

    value: Tensor
    last: Tensor
    stats: SolverStats
    captured: dict[int, Tensor]


def iterate(
    solver: Solver,
    f: FlatMap,
    z0: Tensor,
    *,
    perturbation: FlatPerturbation | None = None,
    capture: Iterable[int] = (),
    throw: bool | None = None,
) -> SolveResult:
    """Iterate ``f`` from ``z0`` (``[B, D]``) with ``solver``'s steps until every sample stops.

    Runs in the current grad mode: under ``torch.no_grad()`` nothing of the path is kept; with autograd on
    (unrolled differentiation) every step is part of the graph. Residuals are always computed without a graph.

    Arguments:
        solver: proposes the next iterate and holds the stop rule.
        f: the map on flat states, ``[B, D] -> [B, D]``.
        z0: the starting point.
        perturbation: ``(z, step) -> z`` applied before the map at each step (steps count from 1); samples
            that already stopped are not perturbed.
        capture: steps after which to keep the state (``f(z)`` of that step); a sample already stopped
            contributes its returned value.
        throw: overrides ``solver.throw`` (an estimator that owns the failure policy passes ``False``).

    Returns:
        A :class:`SolveResult`.
    """
    capture = _check_capture(capture, solver.max_iter)
    fixed_count = solver.tol is None
    batch, steps = z0.shape[0], solver.max_iter
    history = _History(steps, batch, z0.device, z0.dtype)
    memory = solver.init(z0)
    z = last = best_value = z0
    best_res = history.best_res
    limit = history.limit  # divergence_factor times each sample's first absolute residual
    captured: dict[int, Tensor] = {}
    autocast_on = torch.is_autocast_enabled(z0.device.type)
    all_active = True  # known from the last host sync; a full batch skips its masking ops
    taken, active = 0, history.active[0]
    for k in range(1, steps + 1):
        taken = k
        act = history.active[k - 1]  # the samples this step moves
        if torch.is_grad_enabled():  # unrolled: a mask saved for backward must not see later writes
            act = act.clone()
        if perturbation is not None:
            z = perturbation(z, k) if all_active else torch.where(act[:, None], perturbation(z, k), z)
        fz = f(z)
        with torch.no_grad():
            abs_res, res, probe = _residuals(solver.stop_mode, z, fz, safe=fixed_count)
            abs_res, res = history.record(k, abs_res, res)
        if k == 1:
            limit.copy_(abs_res).mul_(solver.divergence_factor)
        improved = res < best_res  # NaN compares false: a non-finite step never improves
        if fixed_count:
            n_active, n_improved = batch, -1  # no stopping, no host sync
        else:
            n_active, n_improved, improved, active, probe = _stop(
                solver, history, k, res, abs_res, improved, all_active, probe
            )
            if not math.isfinite(probe) and _overflowed(act, z, fz):
                with torch.no_grad():
                    abs_res, res, _ = _residuals(solver.stop_mode, z, fz, safe=True)
                    abs_res, res = history.record(k, abs_res, res)
                n_active, n_improved, improved, active, _ = _stop(
                    solver, history, k, res, abs_res, res < best_res, False, res.new_zeros(())
                )
        if n_improved == batch:  # the usual case: every sample improved, no masking needed
            best_res.copy_(res)
            best_value = fz
        else:
            best_res.copy_(torch.where(improved, res, best_res))
            best_value = torch.where(improved[:, None], fz, best_value)
        last = fz if all_active else torch.where(act[:, None], fz, last)
        if k in capture:
            captured[k] = fz if all_active else torch.where(act[:, None], fz, best_value)
        if n_active == 0 or k == steps:
            break
        if autocast_on:
            # Autocast would run the history's matmuls and least-squares solves in bf16/fp16; the state is
            # kept in >= float32 (see _tree.solver_dtype) and so is everything the solver does with it.
            with torch.autocast(z.device.type, enabled=False):
                proposal = solver.step(memory, z, fz)
        else:
            proposal = solver.step(memory, z, fz)
        all_active = n_active == batch
        z = proposal if all_active else torch.where(active[:, None], proposal, z)

    for k in capture:  # every sample stopped before these steps: their state is the returned value
        captured.setdefault(k, best_value)
    stats = history.stats(solver, taken, last)
    if (solver.throw if throw is None else throw) and not stats.all_converged:
        raise FixedPointError(stats.failure_message(), stats)
    return SolveResult(best_value, last, stats, captured)


def _stop(
    solver: Solver,
    history: _History,
    k: int,
    res: Tensor,
    abs_res: Tensor,
    improved: Tensor,
    all_active: bool,
    probe: Tensor,
) -> tuple[int, int, Tensor, Tensor, float]:
    """Apply the stop rule after step ``k``: write who goes on into the history; the one host sync.

    Returns the numbers of active and of improved samples, the masks, and the overflow probe's value.
    """
    act = history.active[k - 1]
    active = solver.terminate(res, abs_res, history.limit)
    if not all_active:
        improved, active = improved & act, active & act
    if k < history.steps:
        history.active[k].copy_(active)
    counts = torch.stack((active.sum().to(probe.dtype), improved.sum().to(probe.dtype), probe)).tolist()
    return int(counts[0]), int(counts[1]), improved, active, counts[2]


class _History:
    """Everything the loop keeps between steps, in buffers allocated once and written in place.

    ``active[k - 1]`` marks the samples that step ``k`` moves; ``res`` and ``abs`` hold each step's residuals.
    """

    def __init__(self, steps: int, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.steps = steps
        self.res = torch.empty(steps, batch, device=device, dtype=dtype)
        self.abs = torch.empty(steps, batch, device=device, dtype=dtype)
        self.active = torch.ones(steps, batch, device=device, dtype=torch.bool)
        self.best_res = torch.full((batch,), torch.inf, dtype=dtype, device=device)
        self.limit = torch.full((batch,), torch.inf, dtype=dtype, device=device)

    def record(self, k: int, abs_res: Tensor, res: Tensor) -> tuple[Tensor, Tensor]:
        """Store step ``k``'s residuals; return views of the stored rows, which outlive the temporaries."""
        self.abs[k - 1].copy_(abs_res)
        self.res[k - 1].copy_(res)
        return self.abs[k - 1], self.res[k - 1]

    def stats(self, solver: Solver, taken: int, last: Tensor) -> SolverStats:
        """Per-sample stats from the first ``taken`` steps."""
        res, abs_res, act = self.res[:taken], self.abs[:taken], self.active[:taken]
        best_res, limit = self.best_res.clone(), self.limit
        nstep = act.sum(dim=0)
        stop = (nstep - 1).clamp_min(0).unsqueeze(0)  # the step at which each sample stopped
        last_res = res.gather(0, stop).squeeze(0)
        last_abs = abs_res.gather(0, stop).squeeze(0)
        if solver.tol is None:
            nonfinite = ~torch.isfinite(last.detach()).all(dim=1)
            result = torch.where(nonfinite, Result.nonfinite, Result.successful)
        else:
            nonfinite = ~torch.isfinite(last_res)
            result = torch.full_like(nstep, Result.max_steps_reached)
            result = torch.where(best_res <= solver.tol, Result.successful, result)
            result = torch.where(~nonfinite & (last_abs > limit), Result.diverged, result)
            result = torch.where(nonfinite, Result.nonfinite, result)
        return SolverStats(
            nstep=nstep,
            residual=best_res,
            result=result.to(torch.int8),
            trace=torch.where(act, res, best_res),  # a stopped sample repeats its best residual
            tol=solver.tol,
            stop_mode=solver.stop_mode,
            max_iter=solver.max_iter,
            divergence_factor=solver.divergence_factor,
            solver=type(solver).__name__,
        )


def _residuals(stop_mode: str, z: Tensor, fz: Tensor, *, safe: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Absolute residual ``||f(z) - z||``, the residual of the stop mode, and an overflow probe, per sample.

    The probe (the sum of the norms) is non-finite whenever a norm is: it tells the loop, at no extra host
    sync, when to check for an overflowed norm of finite states.
    """
    diff = fz - z
    abs_res = _scaled_norm(diff, inplace=True) if safe else torch.linalg.vector_norm(diff, dim=1)
    if stop_mode == "abs":
        return abs_res, abs_res, abs_res.sum()
    fz_norm = _scaled_norm(fz, inplace=False) if safe else torch.linalg.vector_norm(fz, dim=1)
    return abs_res, abs_res / (fz_norm + _REL_EPS), (abs_res + fz_norm).sum()


def _scaled_norm(x: Tensor, *, inplace: bool) -> Tensor:
    """``||x||`` per row without overflow (squares of float32 entries above ~1e19 are inf): ``s ||x / s||``."""
    scale = torch.linalg.vector_norm(x, ord=torch.inf, dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    scaled = x.div_(scale) if inplace else x / scale
    return torch.linalg.vector_norm(scaled, dim=1) * scale.squeeze(1)


def _overflowed(active: Tensor, z: Tensor, fz: Tensor) -> bool:
    """Some active sample has finite states: a non-finite norm of it overflowed and must be recomputed."""
    finite = torch.isfinite(z).all(dim=1) & torch.isfinite(fz).all(dim=1)
    return bool((active & finite).any())


def _check_capture(capture: Iterable[int], max_iter: int) -> list[int]:
    steps = sorted({int(k) for k in capture})
    if steps and (steps[0] < 1 or steps[-1] > max_iter):
        raise ValueError(
            f"capture steps must lie in [1, max_iter={max_iter}], got {steps}; raise max_iter or drop the "
            "later steps."
        )
    return steps
