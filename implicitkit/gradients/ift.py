"""Exact implicit differentiation through the adjoint fixed point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .._tree import State
from ..linear_solvers import LinearSolver
from ..solvers import Anderson, Solver, iterate
from ..stats import AdjointStats, FixedPointError, SolverStats, warn_at_call_site
from .adjoint import attach_adjoint
from .base import VJP, GradientEstimator, Map, PolynomialAdjoint, Recorder

_ON_FAILURE = ("report", "warn", "raise")


class IFT(GradientEstimator):
    """The implicit-function-theorem gradient ``dL/dtheta = u df/dtheta`` with ``u = u J + g``.

    The adjoint ``u = g (I - J)^-1`` is found as the fixed point of ``u -> u J + g`` with any solver, using
    vector-Jacobian products only (never a dense ``J``). The adjoint solver gives the budget (``tol``,
    ``max_iter``, ``stop_mode``); what happens to samples whose adjoint fails is ``on_failure``'s decision
    (the adjoint solver's own ``on_failure`` is not used). Each backward solve's :class:`~implicitkit.AdjointStats`
    (steps, residual, result codes, and the typed ``fell_back`` mask with what those samples received) goes to
    ``Solution.backward_stats`` and to ``callback`` if given.

    No adjoint is solved when nothing but the state could receive a gradient (a frozen cell whose inputs
    need none), nor without autograd. Second derivatives (``create_graph=True``) are refused with an error:
    this backward treats the adjoint as a constant, which would make them wrong.

    Arguments:
        solver: solver of the adjoint fixed point; default ``Anderson(tol=1e-6, max_iter=50)``. Or a linear
            solver (:class:`~implicitkit.GMRES`, :class:`~implicitkit.CG`, :class:`~implicitkit.DirectSolve`)
            of ``u (I - J) = g`` itself, which also converges where ``u -> u J + g`` does not (``J`` with
            eigenvalues on or outside the unit circle, ``I - J`` still invertible).
        on_failure: the forward solvers' vocabulary: ``"raise"`` (a :class:`~implicitkit.FixedPointError`
            naming the cause), ``"warn"`` (keep the best adjoint iterate and emit a ``RuntimeWarning``),
            ``"report"`` (keep it, in the stats only); or a cheaper estimator whose adjoint replaces the failed
            samples' (``JFB()``, ``Neumann(k)``).
        callback: called with the adjoint's stats after each backward solve.

    Reference: Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.
    """

    def __init__(
        self,
        solver: Solver | LinearSolver | None = None,
        *,
        on_failure: str | GradientEstimator = "warn",
        callback: Callable[[SolverStats], None] | None = None,
    ) -> None:
        self.solver = solver if solver is not None else Anderson(tol=1e-6, max_iter=50)
        if not isinstance(self.solver, Solver | LinearSolver):
            raise TypeError(
                f"IFT's solver must be a fixed-point solver (Anderson(), FixedPointIteration(), Broyden()) or a "
                f"linear solver (GMRES(), CG(), DirectSolve()), got {type(self.solver).__name__}."
            )
        if self.solver.tol is None:
            raise ValueError(
                "IFT's adjoint solver needs a tolerance; tol=None would stop without checking it."
            )
        if isinstance(on_failure, str):
            if on_failure not in _ON_FAILURE:
                raise ValueError(
                    f"on_failure must be 'report', 'warn', 'raise' or an estimator such as JFB(), got "
                    f"{on_failure!r}."
                )
        elif not isinstance(on_failure, GradientEstimator):
            raise TypeError(
                f"on_failure must be 'report', 'warn', 'raise' or an estimator such as JFB(), got "
                f"{type(on_failure).__name__}."
            )
        elif not isinstance(on_failure, PolynomialAdjoint):
            raise TypeError(
                f"{type(on_failure).__name__} cannot be IFT's fallback: a fallback must compute its adjoint "
                "from VJPs at z* (JFB() or Neumann(k))."
            )
        self.on_failure = on_failure
        self.callback = callback

    def adjoint_vector(self, g: Tensor, vjp: VJP, record: Recorder | None = None) -> Tensor:
        u, solve_stats = self._solve_adjoint(g, vjp)
        failed = ~solve_stats.converged
        any_failed = bool(failed.any())
        fallback = None
        if any_failed and self.on_failure in ("warn", "report"):
            fallback = "best_iterate"
        elif any_failed and isinstance(self.on_failure, GradientEstimator):
            u = torch.where(failed.unsqueeze(1), self.on_failure.adjoint_vector(g, vjp), u)
            fallback = type(self.on_failure).__name__
        stats = AdjointStats(
            **{f.name: getattr(solve_stats, f.name) for f in dataclasses.fields(SolverStats)},
            fell_back=failed,
            fallback=fallback,
        )
        stats.solver = f"IFT adjoint ({stats.solver})"
        for sink in (record, self.callback):  # recorded before raising, so the failure can be inspected
            if sink is not None:
                sink(stats)
        if any_failed and self.on_failure == "raise":
            raise FixedPointError(
                f"{stats.failure_message()} To train through it with a cheaper gradient for those samples, "
                "pass IFT(on_failure=JFB()).",
                stats,
            )
        if fallback == "best_iterate" and self.on_failure == "warn":
            warn_at_call_site(
                f"{stats.failure_message()} Using the best adjoint iterate for those samples; pass "
                "IFT(on_failure=JFB()) to fall back to a cheaper estimator instead.",
                key=("adjoint", *sorted(set(stats.result.tolist()))),
            )
        return u

    def _solve_adjoint(self, g: Tensor, vjp: VJP) -> tuple[Tensor, SolverStats]:
        """``u`` with ``u (I - J) = g``: the fixed point of ``u -> u J + g``, or the linear system itself."""
        if isinstance(self.solver, LinearSolver):
            return self.solver.solve(
                lambda u: u - vjp(u), g, apply_transposed=lambda v: v - jvp_by_double_backward(vjp, v)
            )
        result = iterate(self.solver, lambda u: vjp(u) + g, g, on_failure="report")
        return result.value, result.stats

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return attach_adjoint(f, z_star, lambda g, vjp: self.adjoint_vector(g, vjp, record), "IFT")


def jvp_by_double_backward(vjp: VJP, v: Tensor) -> Tensor:
    """``J v`` from the VJP ``w -> w J``: the gradient of ``<w J, v>`` with respect to ``w``."""
    w = torch.zeros_like(v, requires_grad=True)
    with torch.enable_grad():
        (jv,) = torch.autograd.grad(vjp(w, create_graph=True), w, v)
    return jv
