"""Conjugate gradients on the normal equations ``A^T A x = A^T b`` (CGNR)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import SolverStats
from .base import LinearSolver, Operator


class CG(LinearSolver):
    """CG on ``A^T A x = A^T b``, which is symmetric positive definite for any invertible ``A``.

    Each iteration costs one product with ``A`` and one with ``A^T`` (for IFT's adjoint a VJP and a JVP,
    the JVP by double backward); convergence follows the condition number of ``A`` squared, so it needs more
    iterations than :class:`GMRES` but no basis in memory. The stop rule is on the true residual
    ``||b - A x||``, tracked by the CGNR recurrence. Each sample's step lengths are its own; a solved sample
    is frozen.

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
        tiny = torch.finfo(b.dtype).tiny
        b_norm = torch.linalg.vector_norm(b, dim=1)
        x, r = torch.zeros_like(b), b.clone()
        z = apply_transposed(r)
        p, zz = z, (z * z).sum(dim=1)
        done = self.residual(r, b_norm) <= self.tol
        nstep = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        trace = [self.residual(r, b_norm)]
        for _ in range(self.max_iter):
            if bool(done.all()):
                break
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
            done = done | (res <= self.tol) | ~torch.isfinite(res)
        return x, self.stats(trace[1:] or trace, nstep)
