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
        max_iter: most products with ``A`` per sample.
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

    def stats(self, trace: list[Tensor], nstep: Tensor) -> SolverStats:
        """Stats from the residual after each product (``trace``) and the products each sample used."""
        history = torch.stack(trace)
        residual = history.gather(0, (nstep - 1).clamp_min(0)[None]).squeeze(0)
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
