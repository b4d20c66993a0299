"""Exact implicit differentiation through the adjoint fixed point."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._tree import State
from ..solvers import Anderson, Solver
from ..stats import FixedPointError, SolverStats
from .adjoint import attach_adjoint
from .base import VJP, GradientEstimator, Map, Recorder

_ON_FAILURE = ("raise", "warn")


class IFT(GradientEstimator):
    """The implicit-function-theorem gradient ``dL/dtheta = u df/dtheta`` with ``u = u J + g``.

    The adjoint ``u = g (I - J)^-1`` is found as the fixed point of ``u -> u J + g`` with any solver, using
    vector-Jacobian products only (never a dense ``J``). The backward solve's stats (steps, residual,
    convergence) are passed to the ``record`` callback of :func:`~implicitkit.fixed_point` (they appear on
    ``Solution.backward_stats``) and to ``callback`` if given.

    What happened to samples whose adjoint solve did not converge is written into those stats:
    ``stats.extra["fell_back"]`` is the ``[B]`` mask of such samples (all false when every sample
    converged) and ``stats.extra["fallback"]`` says what they received: ``None`` (nothing to do),
    ``"best_iterate"`` (``on_failure="warn"``) or the fallback estimator's class name (``"JFB"``,
    ``"Neumann"``).

    Arguments:
        solver: solver of the adjoint fixed point; default ``Anderson(tol=1e-6, max_iter=50)``.
        on_failure: ``"raise"`` (a :class:`~implicitkit.FixedPointError` naming the cause), ``"warn"``
            (keep the best adjoint iterate and emit a ``RuntimeWarning``), or a cheaper estimator whose adjoint
            replaces the failed samples' (``JFB()``, ``Neumann(k)``).
        callback: called with the adjoint's :class:`~implicitkit.SolverStats` after each backward solve.

    Reference: Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.
    """

    def __init__(
        self,
        solver: Solver | None = None,
        *,
        on_failure: str | GradientEstimator = "warn",
        callback: Callable[[SolverStats], None] | None = None,
    ) -> None:
        self.solver = solver if solver is not None else Anderson(tol=1e-6, max_iter=50)
        if isinstance(on_failure, str):
            if on_failure not in _ON_FAILURE:
                raise ValueError(
                    f"on_failure must be 'raise', 'warn' or an estimator such as JFB(), got {on_failure!r}."
                )
        elif not isinstance(on_failure, GradientEstimator):
            raise TypeError(
                f"on_failure must be 'raise', 'warn' or a GradientEstimator, got {type(on_failure).__name__}."
            )
        elif type(on_failure).adjoint_vector is GradientEstimator.adjoint_vector:
            raise TypeError(
                f"{type(on_failure).__name__} cannot be IFT's fallback: a fallback must compute its adjoint "
                "from VJPs at z* (JFB() or Neumann(k))."
            )
        self.on_failure = on_failure
        self.callback = callback

    def adjoint_vector(self, g: Tensor, vjp: VJP, record: Recorder | None = None) -> Tensor:
        result = self.solver.solve(lambda u: vjp(u) + g, g)
        stats, u = result.stats, result.value
        failed = ~stats.converged
        stats.solver = f"IFT adjoint ({stats.solver})"
        stats.extra["fell_back"] = failed
        stats.extra["fallback"] = None
        if bool(failed.any()) and self.on_failure == "warn":
            stats.extra["fallback"] = "best_iterate"
            warnings.warn(
                f"{stats.failure_message()} Using the best adjoint iterate for those samples; pass "
                "IFT(on_failure=JFB()) to fall back to a cheaper estimator instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        elif bool(failed.any()) and isinstance(self.on_failure, GradientEstimator):
            u = torch.where(failed.unsqueeze(1), self.on_failure.adjoint_vector(g, vjp), u)
            stats.extra["fallback"] = type(self.on_failure).__name__
        for sink in (record, self.callback):  # recorded before raising, so the failure can be inspected
            if sink is not None:
                sink(stats)
        if bool(failed.any()) and self.on_failure == "raise":
            raise FixedPointError(
                f"{stats.failure_message()} To train through it with a cheaper gradient for those samples, "
                "pass IFT(on_failure=JFB())."
            )
        return u

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return attach_adjoint(f, z_star, lambda g, vjp: self.adjoint_vector(g, vjp, record))
