"""The one loop every solver runs in: per-sample stopping, best and last iterate, failure codes.

What the loop keeps per step (residuals, which samples were active) goes into buffers allocated once for
``max_iter`` steps: small tensors kept alive between large per-step temporaries fragment the CPU heap, and
then a process's memory grows with the step count even though nothing large is kept.
"""

from __future__ import annotations

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
    active = torch.ones(batch, dtype=torch.bool, device=z0.device)
    best_res = torch.full((batch,), torch.inf, dtype=z0.dtype, device=z0.device)
    limit = best_res  # divergence_factor times each sample's first absolute residual, set at step 1
    captured: dict[int, Tensor] = {}
    autocast_on = torch.is_autocast_enabled(z0.device.type)
    all_active = True  # known from the last host sync; a full batch skips its masking ops
    taken = 0
    for k in range(1, steps + 1):
        taken = k
        act = active
        if perturbation is not None:
            z = perturbation(z, k) if all_active else torch.where(act[:, None], perturbation(z, k), z)
        fz = f(z)
        with torch.no_grad():
            abs_res, res = _residuals(solver.stop_mode, z, fz, safe=fixed_count)
        if k == 1:
            limit = solver.divergence_factor * abs_res
        improved = res < best_res  # NaN compares false: a non-finite step never improves
        if fixed_count:
            n_active, n_improved = batch, -1  # no stopping, no host sync
        else:
            active = solver.terminate(res, abs_res, limit)
            if not all_active:
                improved, active = improved & act, active & act
            n_active, n_improved = torch.stack((active.sum(), improved.sum())).tolist()
            if n_improved < batch and _overflowed(res, act, z, fz):
                abs_res, res = _residuals(solver.stop_mode, z, fz, safe=True)
                improved, active = res < best_res, solver.terminate(res, abs_res, limit)
                improved, active = improved & act, active & act
                n_active, n_improved = torch.stack((active.sum(), improved.sum())).tolist()
        if n_improved == batch:  # the usual case: every sample improved, no masking needed
            best_res, best_value = res, fz
        else:
            best_res = torch.where(improved, res, best_res)
            best_value = torch.where(improved[:, None], fz, best_value)
        last = fz if all_active else torch.where(act[:, None], fz, last)
        history.record(k, res, abs_res, act)
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
    stats = history.stats(solver, taken, best_res, limit, last)
    if (solver.throw if throw is None else throw) and not stats.all_converged:
        raise FixedPointError(stats.failure_message(), stats)
    return SolveResult(best_value, last, stats, captured)


class _History:
    """``[max_iter, B]`` buffers of residuals and activity, written in place once per step."""

    def __init__(self, steps: int, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.res = torch.empty(steps, batch, device=device, dtype=dtype)
        self.abs = torch.empty(steps, batch, device=device, dtype=dtype)
        self.active = torch.zeros(steps, batch, device=device, dtype=torch.bool)

    def record(self, k: int, res: Tensor, abs_res: Tensor, active: Tensor) -> None:
        self.res[k - 1].copy_(res)
        self.abs[k - 1].copy_(abs_res)
        self.active[k - 1].copy_(active)

    def stats(self, solver: Solver, taken: int, best_res: Tensor, limit: Tensor, last: Tensor) -> SolverStats:
        """Per-sample stats from the first ``taken`` rows."""
        res, abs_res, act = self.res[:taken], self.abs[:taken], self.active[:taken]
        nstep = act.sum(dim=0)
        stop = (nstep - 1).clamp_min(0).unsqueeze(0)  # the step at which each sample stopped
        last_res = res.gather(0, stop).squeeze(0)
        last_abs = abs_res.gather(0, stop).squeeze(0)
        best_res = best_res.detach()
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


def _residuals(stop_mode: str, z: Tensor, fz: Tensor, *, safe: bool) -> tuple[Tensor, Tensor]:
    """Absolute residual ``||f(z) - z||`` and the residual of the stop mode, per sample."""
    norm = _scaled_norm if safe else _plain_norm
    abs_res = norm(fz - z)
    if stop_mode == "abs":
        return abs_res, abs_res
    return abs_res, abs_res / (norm(fz) + _REL_EPS)


def _plain_norm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1)


def _scaled_norm(x: Tensor) -> Tensor:
    """``||x||`` per row without overflow: the squares of entries above ~1e19 overflow float32."""
    scale = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    return torch.linalg.vector_norm(x / scale, dim=1) * scale.squeeze(1)


def _overflowed(res: Tensor, active: Tensor, z: Tensor, fz: Tensor) -> bool:
    """Some active sample's residual is inf or NaN although its states are finite (a norm overflowed)."""
    bad = active & ~torch.isfinite(res)
    if not bool(bad.any()):
        return False
    finite = torch.isfinite(z[bad]).all(dim=1) & torch.isfinite(fz[bad]).all(dim=1)
    return bool(finite.any())


def _check_capture(capture: Iterable[int], max_iter: int) -> list[int]:
    steps = sorted({int(k) for k in capture})
    if steps and (steps[0] < 1 or steps[-1] > max_iter):
        raise ValueError(
            f"capture steps must lie in [1, max_iter={max_iter}], got {steps}; raise max_iter or drop the "
            "later steps."
        )
    return steps
