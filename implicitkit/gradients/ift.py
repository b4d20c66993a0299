"""Exact implicit differentiation through the adjoint fixed point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .._tree import State
from ..linear_solvers import LinearSolver
from ..linearize import Linearization
from ..solvers import Anderson, Solver, iterate
from ..stats import FAILURE_POLICIES, AdjointStats, FixedPointError, SolverStats, warn_at_call_site
from .adjoint import attach_adjoint
from .base import VJP, GradientEstimator, Map, PolynomialAdjoint, Recorder
from .second_order import THIRD_ORDER_MESSAGE, attach_twice_differentiable
from .tangent import attach_tangent, under_vmap


class IFT(GradientEstimator):
    """The implicit-function-theorem gradient ``dL/dtheta = u df/dtheta`` with ``u = u J + g``.

    The adjoint ``u = g (I - J)^-1`` is found as the fixed point of ``u -> u J + g`` with any solver, using
    vector-Jacobian products only (never a dense ``J``). The adjoint solver gives the budget (``tol``,
    ``max_iter``, ``stop_mode``); what happens to samples whose adjoint fails is ``on_failure``'s decision
    (the adjoint solver's own ``on_failure`` is not used). Each backward solve's :class:`~implicitkit.AdjointStats`
    (steps, residual, result codes, and the typed ``fell_back`` mask with what those samples received) goes to
    ``Solution.backward_stats`` and to ``callback`` if given.

    No adjoint is solved when nothing but the state could receive a gradient (a frozen cell whose inputs
    need none), nor without autograd. In forward mode (``torch.func.jvp``, dual tensors) the tangent of
    ``z*`` solves ``(I - J) t = (df/dtheta) t_theta`` with the same solver and JVPs only
    (:meth:`tangent_vector`).

    Second derivatives (``create_graph=True``) are refused by default: the plain backward treats the adjoint
    as a constant, which would make them wrong. ``second_order=True`` makes them exact: the adjoint fixed
    point is itself attached implicitly (its backward solves the transposed system ``(I - J) y = w``) and the
    first-order graph is built at a ``z*`` that carries its own derivative. It costs a second graph of ``f``
    at ``z*`` in the forward pass; first-order gradients are unchanged. Solves that are part of a second
    derivative must converge: a failure raises a :class:`~implicitkit.FixedPointError` instead of falling back.

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
        second_order: make ``create_graph=True`` exact instead of refused.

    Reference: Bai, Kolter & Koltun, "Deep equilibrium models", NeurIPS 2019.
    """

    def __init__(
        self,
        solver: Solver | LinearSolver | None = None,
        *,
        on_failure: str | GradientEstimator = "warn",
        callback: Callable[[SolverStats], None] | None = None,
        second_order: bool = False,
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
            if on_failure not in FAILURE_POLICIES:
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
        self.second_order = bool(second_order)

    def adjoint_vector(self, g: Tensor, vjp: VJP, record: Recorder | None = None) -> Tensor:
        """The adjoint ``u`` (flat ``[B, D]``) with ``u (I - J) = g``, found from VJPs ``v -> v J`` only.

        Arguments:
            g: the flat cotangent ``dL/dz*``.
            vjp: ``v -> v J`` at ``z*``.
            record: called with the solve's :class:`~implicitkit.AdjointStats`.

        Returns:
            ``u``; samples whose solve failed are handled as ``on_failure`` says.
        """
        return self._solve(
            g,
            vjp,
            lambda v: v - jvp_by_double_backward(vjp, v),
            record,
            "adjoint",
            lambda estimator: estimator.adjoint_vector(g, vjp),
        )

    def tangent_vector(self, b: Tensor, jvp: VJP, record: Recorder | None = None) -> Tensor:
        """The tangent ``t`` (flat ``[B, D]``) with ``(I - J) t = b``, found from JVPs ``v -> J v`` only.

        This is forward-mode differentiation through the fixed point: ``b = (df/dtheta) t_theta`` is the
        tangent of ``f(z*)`` at a constant ``z*``, and ``t`` is the tangent of ``z*`` itself. The same solver,
        budget and failure policy as the adjoint; the stats are recorded the same way.

        Arguments:
            b: the flat tangent of ``f`` at a constant ``z*``.
            jvp: ``v -> J v`` at ``z*``.
            record: called with the solve's :class:`~implicitkit.AdjointStats`.

        Returns:
            ``t``; samples whose solve failed are handled as ``on_failure`` says.
        """
        if under_vmap():
            raise RuntimeError(
                "IFT cannot solve for the tangent under torch.func.vmap or jacfwd: its solver stops each "
                "sample on its own, which needs residuals read on the host, and vmap cannot read them. Take "
                "one torch.func.jvp per direction (or use torch.autograd.forward_ad), or put the directions "
                "in the batch dimension; jacfwd works with Neumann(k), JFB, Phantom, RAG and Unrolled."
            )
        return self._solve(
            b, jvp, None, record, "tangent", lambda estimator: estimator.tangent_vector(b, jvp)
        )

    def _solve(
        self,
        rhs: Tensor,
        product: VJP,
        product_transposed: VJP | None,
        record: Recorder | None,
        kind: str,
        fallback_vector: Callable[[PolynomialAdjoint], Tensor] | None,
    ) -> Tensor:
        """``x = x P + rhs`` for the product ``P`` (``J`` from the left or the right), with the failure policy.

        Without ``fallback_vector`` the solve is part of a second derivative, which must be exact: a sample
        whose solve failed raises an error instead of being replaced.
        """
        x, solve_stats = self._solve_linear(rhs, product, product_transposed)
        failed = ~solve_stats.converged
        any_failed = bool(failed.any())
        fallback = None
        if any_failed and fallback_vector is None:
            pass
        elif any_failed and self.on_failure in ("warn", "report"):
            fallback = "best_iterate"
        elif any_failed and isinstance(self.on_failure, PolynomialAdjoint):
            x = torch.where(failed.unsqueeze(1), fallback_vector(self.on_failure), x)
            fallback = type(self.on_failure).__name__
        stats = AdjointStats(
            **{f.name: getattr(solve_stats, f.name) for f in dataclasses.fields(SolverStats)},
            fell_back=failed,
            fallback=fallback,
        )
        stats.solver = f"IFT {kind} ({stats.solver})"
        for sink in (record, self.callback):  # recorded before raising, so the failure can be inspected
            if sink is not None:
                sink(stats)
        if any_failed and fallback_vector is None:
            raise FixedPointError(
                f"{stats.failure_message()} A second derivative through IFT needs every {kind} solve to "
                "converge (a best iterate or a fallback would make it wrong), so it is refused: raise the "
                "adjoint solver's max_iter or loosen its tol.",
                stats,
            )
        if any_failed and self.on_failure == "raise":
            raise FixedPointError(
                f"{stats.failure_message()} To train through it with a cheaper gradient for those samples, "
                "pass IFT(on_failure=JFB()).",
                stats,
            )
        if fallback == "best_iterate" and self.on_failure == "warn":
            warn_at_call_site(
                f"{stats.failure_message()} Using the best {kind} iterate for those samples; pass "
                "IFT(on_failure=JFB()) to fall back to a cheaper estimator instead.",
                key=(kind, *sorted(set(stats.result.tolist()))),
            )
        return x

    def _solve_linear(
        self, rhs: Tensor, product: VJP, product_transposed: VJP | None
    ) -> tuple[Tensor, SolverStats]:
        """``x`` with ``x - P x = rhs``: the fixed point of ``x -> P x + rhs``, or the linear system itself."""
        if isinstance(self.solver, LinearSolver):
            if self.solver.needs_transposed and product_transposed is None:
                # forward mode gives J v only; J^T products would need a reverse pass it does not have
                raise TypeError(
                    f"IFT({type(self.solver).__name__}()) cannot solve for a forward-mode tangent: it solves "
                    "the normal equations, which need products with J^T as well as J, and forward mode has "
                    "only J v. Use IFT(GMRES()) or IFT(DirectSolve()) under torch.func.jvp / forward_ad."
                )
            return self.solver.solve(lambda x: x - product(x), rhs, apply_transposed=product_transposed)
        if self.solver.stop_mode != "rel":
            result = iterate(self.solver, lambda x: product(x) + rhs, rhs)
            return result.value, result.stats
        # The system is linear: solved for rhs / ||rhs|| and scaled back, per sample, the relative rule is
        # the same at any scale of the loss (its guard against a zero denominator, 1e-8, would otherwise
        # end the solve early for a cotangent of norm 1e-8 or less).
        scale = torch.linalg.vector_norm(rhs, dim=1, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        unit = rhs / scale
        result = iterate(self.solver, lambda x: product(x) + unit, unit)
        return result.value * scale, result.stats

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        tangent = lambda b, jvp: self.tangent_vector(b, jvp, record)  # noqa: E731
        if not self.second_order:
            adjoint = lambda g, vjp: self.adjoint_vector(g, vjp, record)  # noqa: E731
            return attach_adjoint(f, z_star, adjoint, "IFT", tangent)
        out = attach_twice_differentiable(
            f,
            z_star,
            lambda g, vjp: self.adjoint_vector(g, vjp, record),
            lambda g, vjp: self._exact_adjoint(g, vjp, record),
            lambda g, lin: self._differentiable_adjoint(g, lin, record),
            "IFT(second_order=True)",
        )
        return attach_tangent(f, z_star, out, tangent, "IFT(second_order=True)")

    def _exact_adjoint(self, g: Tensor, vjp: VJP, record: Recorder | None) -> Tensor:
        """The adjoint solved to tolerance, or an error: no best iterate, no fallback."""
        return self._solve(g, vjp, lambda v: v - jvp_by_double_backward(vjp, v), record, "adjoint", None)

    def _differentiable_adjoint(self, g: Tensor, lin: Linearization, record: Recorder | None) -> Tensor:
        """``u = g (I - J)^-1`` with its graph: the linear fixed point ``u = u J + g`` attached implicitly.

        Its backward solves the transposed system ``y = J y + w`` (JVPs by double backward) and then carries
        ``y`` through ``u J + g`` to ``g``, the parameters and the point, where ``J`` is taken.
        """
        u = self._exact_adjoint(g.detach(), lin.vjp, record)

        def adjoint_map(v: Tensor) -> Tensor:
            return lin.vjp(v, create_graph=True) + g

        return attach_adjoint(
            adjoint_map,
            u,
            lambda w, vjp: self._exact_adjoint(w, vjp, record),
            "IFT",
            refusal=THIRD_ORDER_MESSAGE.format(name="IFT(second_order=True)"),
        )


def jvp_by_double_backward(vjp: VJP, v: Tensor) -> Tensor:
    """``J v`` from the VJP ``w -> w J``: the gradient of ``<w J, v>`` with respect to ``w``."""
    w = torch.zeros_like(v, requires_grad=True)
    with torch.enable_grad():
        (jv,) = torch.autograd.grad(vjp(w, create_graph=True), w, v)
    return jv
