"""The shared loop of every fixed-point solver: per-sample stopping, best iterate, failure detection.

A concrete solver only says how to propose the next iterate from the current one and its image under the
map (:meth:`Solver.init` and :meth:`Solver.step`); the loop around it is the same for all and lives here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..stats import FixedPointError, SolverStats

FlatMap = Callable[[Tensor], Tensor]
FlatPerturbation = Callable[[Tensor, int], Tensor]

_STOP_MODES = ("abs", "rel")
# Keeps the relative residual finite at a fixed point of (near) zero norm.
_REL_EPS = 1e-8


@dataclass
class SolveResult:
    """Flat output of :meth:`Solver.solve`: the best iterate ``[B, D]``, its stats and captured states."""

    value: Tensor
    stats: SolverStats
    captured: dict[int, Tensor]


def residual_norms(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample absolute and relative residuals ``||f(z) - z||`` and ``||f(z) - z|| / ||f(z)||``."""
    abs_res = torch.linalg.vector_norm(fz - z, dim=1)
    rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1) + _REL_EPS)
    return abs_res, rel_res


def replace_row(buffer: Tensor, slot: int, row: Tensor) -> Tensor:
    """``buffer[:, slot] = row``, out of place when autograd tracks either (unrolled backprop needs it)."""
    if buffer.requires_grad or row.requires_grad:
        buffer = buffer.clone()
    buffer[:, slot] = row
    return buffer


class Solver(ABC):
    """Finds ``z* = f(z*)`` for a batch of samples, each stopping on its own.

    Every sample ``b`` is iterated until its residual ``r_b = ||f(z_b) - z_b||`` (``stop_mode="abs"``) or
    ``r_b / ||f(z_b)||`` (``"rel"``) is at most ``tol``; from then on it is frozen, so its value and step
    count do not depend on the rest of the batch. The value returned for a sample is ``f(z_k)`` at the step
    ``k`` with the lowest residual, never worse than the last. A sample whose map returns NaN/inf, or whose
    absolute residual grows past ``divergence_factor`` times its first one, is stopped and flagged.

    Arguments:
        tol: residual at which a sample counts as converged.
        max_iter: most applications of the map per sample; the solve always returns after at most this many.
        stop_mode: ``"abs"`` or ``"rel"``, the residual the stop rule (and ``stats.residual``) uses.
        throw: raise :class:`FixedPointError` naming the cause when any sample fails, instead of reporting it
            in the stats only.
        divergence_factor: how much the absolute residual may grow over its first value before the sample is
            declared diverged.
    """

    def __init__(
        self,
        *,
        tol: float = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        throw: bool = False,
        divergence_factor: float = 1e4,
    ) -> None:
        if stop_mode not in _STOP_MODES:
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}.")
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}.")
        if tol < 0:
            raise ValueError(f"tol must be non-negative, got {tol}.")
        if divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be above 1, got {divergence_factor}.")
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.stop_mode = stop_mode
        self.throw = throw
        self.divergence_factor = float(divergence_factor)

    # -- what a concrete solver provides -------------------------------------------------------------
    @abstractmethod
    def init(self, z0: Tensor) -> Any:
        """Create the solver's memory (history, inverse-Jacobian factors) for a ``[B, D]`` start."""

    @abstractmethod
    def step(self, memory: Any, z: Tensor, fz: Tensor) -> Tensor:
        """Propose the next iterate from ``z`` and ``f(z)``, updating ``memory`` in place."""

    # -- the shared loop -----------------------------------------------------------------------------
    def solve(
        self,
        f: FlatMap,
        z0: Tensor,
        *,
        perturbation: FlatPerturbation | None = None,
        capture: Iterable[int] = (),
    ) -> SolveResult:
        """Iterate ``f`` from ``z0`` (``[B, D]``) until every sample stops.

        Arguments:
            f: the map on flat states, ``[B, D] -> [B, D]``.
            z0: the starting point.
            perturbation: ``(z, step) -> z`` applied before the map at each step (steps count from 1).
            capture: steps after which to keep the state (``f(z)`` of that step); a sample already stopped
                contributes its returned value.

        Returns:
            A :class:`SolveResult` with the best iterate, the stats and the captured states by step.
        """
        capture = sorted({int(k) for k in capture})
        if capture and (capture[0] < 1 or capture[-1] > self.max_iter):
            raise ValueError(
                f"capture steps must lie in [1, max_iter={self.max_iter}], got {capture}; raise max_iter or "
                "drop the later steps."
            )
        capture_set = set(capture)
        batch = z0.shape[0]
        memory = self.init(z0)
        z = z0
        active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        best_value = z0
        best_res = torch.full((batch,), float("inf"), dtype=z0.dtype, device=z0.device)
        limit = None  # divergence_factor times each sample's first absolute residual
        # Per step only what the stop rule and the best iterate need; counts, flags and the trace are
        # rebuilt from these histories once the loop is over (fewer small ops per step).
        res_hist: list[Tensor] = []
        abs_hist: list[Tensor] = []
        active_hist: list[Tensor] = []
        captured: dict[int, Tensor] = {}
        autocast_on = torch.is_autocast_enabled(z0.device.type)

        all_active = True  # known from the last host sync; lets a full batch skip its masking ops
        for k in range(1, self.max_iter + 1):
            if perturbation is not None:
                z = perturbation(z, k)
            fz = f(z)
            abs_res, res = self._residuals(z, fz)
            act = active
            if limit is None:
                limit = self.divergence_factor * abs_res
            improved = res < best_res  # NaN compares false: a non-finite step never improves
            # Continue while above tol and not grown past the limit; NaN fails both tests and stops.
            active = (res > self.tol) & (abs_res <= limit)
            if not all_active:
                improved = improved & act
                active = active & act
            if k < self.max_iter:  # the one host synchronisation per step
                n_active, n_improved = torch.stack((active.sum(), improved.sum())).tolist()
            else:
                n_active, n_improved = 0, -1
            if n_improved == batch:  # the usual case: every sample improved, no masking needed
                best_res, best_value = res, fz
            else:
                best_res = torch.where(improved, res, best_res)
                best_value = torch.where(improved.unsqueeze(1), fz, best_value)
            res_hist.append(res)
            abs_hist.append(abs_res)
            active_hist.append(act)
            if k in capture_set:
                captured[k] = torch.where(act.unsqueeze(1), fz, best_value)
            if n_active == 0:
                break
            if autocast_on:
                # Autocast would run the history's matmuls and least-squares solves in bf16/fp16; the state
                # is kept in >= float32 (see _tree.solver_dtype) and so is everything the solver does with it.
                with torch.autocast(z.device.type, enabled=False):
                    proposal = self.step(memory, z, fz)
            else:
                proposal = self.step(memory, z, fz)
            all_active = n_active == batch
            z = proposal if all_active else torch.where(active.unsqueeze(1), proposal, z)

        for k in capture:  # every sample stopped before these steps: their state is the returned value
            captured.setdefault(k, best_value)
        stats = self._stats(
            best_res, limit, torch.stack(res_hist), torch.stack(abs_hist), torch.stack(active_hist)
        )
        if self.throw and not stats.all_converged:
            raise FixedPointError(stats.failure_message())
        return SolveResult(best_value, stats, captured)

    def _residuals(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """Absolute residual and the residual of the stop mode, per sample."""
        abs_res = torch.linalg.vector_norm(fz - z, dim=1)
        if self.stop_mode == "abs":
            return abs_res, abs_res
        return abs_res, abs_res / (torch.linalg.vector_norm(fz, dim=1) + _REL_EPS)

    def _stats(
        self, best_res: Tensor, limit: Tensor, res: Tensor, abs_res: Tensor, act: Tensor
    ) -> SolverStats:
        """Per-sample stats from the ``[T, B]`` histories of residuals and of which samples were active."""
        nstep = act.sum(dim=0)
        last = (nstep - 1).unsqueeze(0)  # the step at which each sample stopped
        last_res = res.gather(0, last).squeeze(0)
        last_abs = abs_res.gather(0, last).squeeze(0)
        nonfinite = ~torch.isfinite(last_res)
        return SolverStats(
            nstep=nstep,
            residual=best_res,
            converged=best_res <= self.tol,
            diverged=~nonfinite & (last_abs > limit),
            nonfinite=nonfinite,
            trace=torch.where(act, res, best_res),  # a stopped sample repeats its best residual
            tol=self.tol,
            stop_mode=self.stop_mode,
            max_iter=self.max_iter,
            solver=type(self).__name__,
            extra={"divergence_factor": self.divergence_factor},
        )

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if not k.startswith("_")]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"
