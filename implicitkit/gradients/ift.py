"""Exact implicit differentiation through the adjoint fixed point."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._tree import State
from ..solvers import Anderson, Solver
from ..stats import FixedPointError
from .adjoint import attach_adjoint
from .base import VJP, GradientEstimator, Map, Recorder

_ON_FAILURE = ("raise", "warn")


class IFT(GradientEstimator):
    """The implicit-function-theorem gradient ``dL/dtheta = u df/dtheta`` with ``u = u J + g``.

    The adjoint ``u = g (I - J)^-1`` is found as the fixed point of ``u -> u J + g`` with any solver, using
    vector-Jacobian products only (never a dense ``J``). The backward solve's stats (steps, residual,
    convergence) are passed to the ``record`` callback of :func:`~implicitkit.fixed_point` (they appear on
    ``Solution.backward_stats``) and to ``callback`` if given.

    Arguments:
        solver: solver of the adjoint fixed point; default ``Anderson(tol=1e-6, max_iter=50)``.
        on_failure: what to do for samples whose adjoint solve did not converge: ``"raise"`` (a
            :class:`FixedPointError` naming the cause), ``"warn"`` (keep the best adjoint iterate and warn),
            or a cheaper estimator usable as a fallback (``JFB()``, ``Neumann(k)``) whose adjoint replaces
            those samples'. The stats say which happened (``stats.extra["fallback"]``).
        callback: called with the adjoint's :class:`SolverStats` after each backward solve.
    """

    def __init__(
        self,
        solver: Solver | None = None,
        *,
        on_failure: str | GradientEstimator = "warn",
        callback=None,
    ) -> None:
        self.solver = solver if solver is not None else Anderson(tol=1e-6, max_iter=50)
        if isinstance(on_failure, str):
            if on_failure not in _ON_FAILURE:
                raise ValueError(f"on_failure must be 'raise', 'warn' or an estimator, got {on_failure!r}.")
        elif type(on_failure).adjoint_vector is GradientEstimator.adjoint_vector:
            raise TypeError(
                f"{type(on_failure).__name__} cannot be IFT's fallback: a fallback must compute its adjoint from "
                "VJPs at z* (JFB() or Neumann(k))."
            )
        self.on_failure = on_failure
        self.callback = callback

    def adjoint_vector(self, g: Tensor, vjp: VJP, record: Recorder | None = None) -> Tensor:
        result = self.solver.solve(lambda u: vjp(u) + g, g)
        stats = result.stats
        u = result.value
        stats.extra["fallback"] = None
        if not stats.all_converged:
            failed = ~stats.converged
            if self.on_failure == "raise":
                raise FixedPointError("IFT adjoint solve: " + (stats.failure_message() or ""))
            if self.on_failure == "warn":
                warnings.warn(
                    f"IFT adjoint solve did not converge for {int(failed.sum())} samples; using the best "
                    f"adjoint iterate. {stats.failure_message()}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                u = torch.where(failed.unsqueeze(1), self.on_failure.adjoint_vector(g, vjp), u)
                stats.extra["fallback"] = type(self.on_failure).__name__
            stats.extra["fell_back"] = failed
        for sink in (record, self.callback):
            if sink is not None:
                sink(stats)
        return u

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return attach_adjoint(f, z_star, lambda g, vjp: self.adjoint_vector(g, vjp, record))


