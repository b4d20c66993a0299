"""Conjugate gradients on the normal equations ``A^T A x = A^T b`` (CGNR)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import SolverStats
from .base import IterativeLinearSolver, Operator


class CG(IterativeLinearSolver):
    """CG on ``A^T A x = A^T b``, which is symmetric positive definite for any invertible ``A``.

    Each iteration costs one product with ``A`` and one with ``A^T`` (for IFT's adjoint a VJP and a JVP,
    the JVP by double backward); convergence follows the condition number of ``A`` squared, so it needs more
    iterations than :class:`GMRES` but no basis in memory. The stop rule is on the residual ``||b - A x||``
    as the CGNR recurrence tracks it, confirmed by one more product (a sample whose true residual is above
    ``tol`` restarts from there: :class:`~implicitkit.linear_solvers.base.IterativeLinearSolver`). Each
    sample's step lengths are its own; a solved sample is frozen.

    Arguments:
        **kwargs: ``tol``, ``max_iter`` (iterations, two products each), ``stop_mode`` of :class:`LinearSolver`.

    Reference: Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems", 1952.
    """

    needs_transposed = True

    def solve(
        self, apply: Operator, b: Tensor, *, apply_transposed: Operator | None = None
    ) -> tuple[Tensor, SolverStats]:
        if apply_transposed is None:
            raise TypeError("CG solves the normal equations and needs apply_transposed (x -> A^T x).")
        return super().solve(apply, b, apply_transposed=apply_transposed)

    def _iterate(self, apply, apply_transposed, b_norm, x, r, done, nstep, trace, iterations):
        """CG from ``x``, whose residual is ``r``, until every sample is solved by the recurrence or time is up."""
        tiny = torch.finfo(r.dtype).tiny
        z = apply_transposed(r)
        p, zz = z, (z * z).sum(dim=1)
        while iterations < self.max_iter and not bool(done.all()):
            w = apply(p)
            alpha = zz / (w * w).sum(dim=1).clamp_min(tiny)
            alpha = torch.where(done, 0.0, alpha)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * w
            z = apply_transposed(r)
            zz_new = (z * z).sum(dim=1)
            p = z + (zz_new / zz.clamp_min(tiny))[:, None] * p
            zz = zz_new
            res = self.residual(r, b_norm)
            nstep += (~done).long()
            trace.append(torch.where(done, trace[-1], res))
            done |= (res <= self.tol) | ~torch.isfinite(res)
            iterations += 1
        return x, iterations
