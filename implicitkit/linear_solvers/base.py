"""The linear-solver protocol: ``A x = b`` for a batch of samples, with ``A`` known only through products."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from .._settings import as_count, settings_repr
from ..stats import Result, SolverStats

Operator = Callable[[Tensor], Tensor]  # x [B, D] -> A x [B, D], each sample its own matrix


class LinearSolver(ABC):
    """Solves ``A_b x_b = b_b`` for every sample ``b`` of a batch, where ``A`` is given as products.

    IFT uses it for the adjoint, ``u (I - J) = g``: ``A u = u - u J`` (one VJP per product). A sample counts as
    solved when its residual ``||b - A x||`` is at most ``tol`` (``stop_mode="abs"``) or ``tol ||b||``
    (``"rel"``); stats and result codes are those of the fixed-point solvers (:class:`~implicitkit.SolverStats`).

    Arguments:
        tol: the residual at which a sample counts as solved.
        max_iter: most iterations per sample (products with ``A``; for CG, a pair of products). The check
            of :class:`IterativeLinearSolver` costs one product more each time a sample is called solved.
        stop_mode: ``"abs"`` or ``"rel"``.
    """

    needs_transposed = False  # True for solvers that also take products with A^T (apply_transposed)

    def __init__(self, *, tol: float = 1e-6, max_iter: int = 100, stop_mode: str = "rel") -> None:
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}.")
        if not tol >= 0:
            raise ValueError(f"tol must be non-negative, got {tol}.")
        max_iter = as_count("max_iter", max_iter)
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}.")
        self.tol, self.max_iter, self.stop_mode = float(tol), max_iter, stop_mode

    @abstractmethod
    def solve(
        self, apply: Operator, b: Tensor, *, apply_transposed: Operator | None = None
    ) -> tuple[Tensor, SolverStats]:
        """``x`` ``[B, D]`` with ``A x ~ b`` per sample, and the solve's stats.

        Arguments:
            apply: ``x -> A x``.
            b: the right-hand side.
            apply_transposed: ``x -> A^T x``, for solvers that need it (:class:`~implicitkit.CG`).
        """

    def residual(self, r: Tensor, b_norm: Tensor) -> Tensor:
        """``[B]`` residual of ``r = b - A x`` under the stop mode."""
        norm = torch.linalg.vector_norm(r, dim=1)
        return norm if self.stop_mode == "abs" else norm / b_norm.clamp_min(torch.finfo(r.dtype).tiny)

    def stats(
        self, trace: list[Tensor], nstep: Tensor, final: Tensor | None = None, last_row: Tensor | None = None
    ) -> SolverStats:
        """Stats from the residual after each product (``trace``) and the products each sample used.

        ``final``, where given, is each sample's true residual at its returned ``x``: it replaces the
        estimate at the sample's last active row (``last_row``, default ``nstep - 1``) and every row after it,
        except where that estimate is already NaN (a sample stopped as nonfinite).
        """
        history = torch.stack(trace)
        last = (nstep - 1 if last_row is None else last_row).clamp_min(0)[None]
        residual = history.gather(0, last).squeeze(0)
        if final is not None:
            residual = torch.where(torch.isnan(residual), residual, final)
            rows = torch.arange(history.shape[0], device=history.device)[:, None]
            history = torch.where(rows >= last, residual[None], history)
        result = torch.where(residual <= self.tol, Result.successful, Result.max_steps_reached)
        result = torch.where(torch.isfinite(residual), result, Result.nonfinite)
        return SolverStats(
            nstep=nstep,
            residual=residual,
            result=result.to(torch.int8),
            trace=history,
            tol=self.tol,
            stop_mode=self.stop_mode,
            max_iter=self.max_iter,
            divergence_factor=float("inf"),
            solver=type(self).__name__,
        )

    def __repr__(self) -> str:
        return settings_repr(self)


class IterativeLinearSolver(LinearSolver):
    """A solver whose stop rule reads a recurrence's estimate of the residual, checked against the true one.

    GMRES's least-squares residual and CG's recurrence drift from ``||b - A x||`` in finite precision (in
    float32 at ``tol=1e-6`` they understate it 5-15x). So a sample the estimate calls solved is checked with
    one more product: if ``||b - A x||`` is above ``tol`` it is iterated again from there (a restart), unless
    its true residual did not fall to half of its previous check, in which case it stops, reported with
    that true residual. The stats always carry the true residual of the returned ``x``.
    """

    def solve(
        self, apply: Operator, b: Tensor, *, apply_transposed: Operator | None = None
    ) -> tuple[Tensor, SolverStats]:
        b_norm = torch.linalg.vector_norm(b, dim=1)
        x, r = torch.zeros_like(b), b.clone()  # r = b - A x at x = 0, without a product
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [self.residual(r, b_norm)]  # dropped below unless nothing ran
        done = trace[0] <= self.tol
        settled, checked, used = done.clone(), trace[0], 0
        last_row = torch.zeros_like(nstep)  # each sample's last row of trace[1:] in which it iterated
        while True:
            true = self.residual(r, b_norm)
            claimed = done & ~settled & torch.isfinite(trace[-1])
            falling = true <= 0.5 * checked  # False for NaN: a sample that turned nonfinite stops
            done &= ~(claimed & (true > self.tol) & falling)  # reopened: iterated again from x
            checked = torch.where(claimed, true, checked)
            settled = done.clone()
            if used >= self.max_iter or bool(done.all()):
                return x, self.stats(trace[1:] or trace, nstep, final=true, last_row=last_row)
            rows_before, nstep_before = len(trace) - 1, nstep.clone()
            x, used = self._iterate(apply, apply_transposed, b_norm, x, r, done, nstep, trace, used)
            ran = nstep - nstep_before  # within one call a sample iterates in its first `ran` rows
            last_row = torch.where(ran > 0, rows_before + ran - 1, last_row)
            r = b - apply(x)

    @abstractmethod
    def _iterate(self, apply, apply_transposed, b_norm, x, r, done, nstep, trace, used) -> tuple[Tensor, int]:
        """Iterate from ``x`` (with true residual ``r``) until every sample is ``done`` or ``max_iter`` is used.

        May stop earlier (GMRES at a restart). Marks the samples it solves in ``done``, counts each sample's
        iterations in ``nstep``, appends the estimated residual after each iteration to ``trace`` (a done
        sample keeps its last value; a nonfinite one gets NaN) and returns ``x`` and the iterations used.
        """
