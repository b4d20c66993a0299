"""Anderson acceleration (type II, regularised least squares)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Solver, replace_row


@dataclass
class _History:
    z: Tensor  # [B, m, D] past iterates
    fz: Tensor  # [B, m, D] their images
    gram: Tensor  # [B, m, m] Gram matrix of the residuals fz - z, updated one row per step
    count: int = 0


class Anderson(Solver):
    """Anderson acceleration: mix the last ``m`` iterates to cancel their residuals.

    With residuals ``G_i = f(z_i) - z_i`` of the last ``n <= m`` steps, each step solves, per sample,

    ``alpha = argmin ||sum_i alpha_i G_i||^2 + lam ||alpha||^2   subject to   sum_i alpha_i = 1``

    and moves to ``z_{k+1} = beta sum_i alpha_i f(z_i) + (1 - beta) sum_i alpha_i z_i``. The constrained
    problem is solved through its KKT system with the Gram matrix kept in at least float32. ``lam`` is
    relative to the Gram matrix's mean diagonal, so the step does not depend on the scale of the state.

    Arguments:
        m: history size.
        beta: mixing (1 takes the images only).
        lam: Tikhonov regularisation of the least-squares problem, relative to its scale.
        **kwargs: ``tol``, ``max_iter``, ``stop_mode``, ``throw``, ``divergence_factor`` of :class:`Solver`.

    Reference: Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    """

    def __init__(self, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4, **kwargs) -> None:
        super().__init__(**kwargs)
        if m < 1:
            raise ValueError(f"history size m must be at least 1, got {m}.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {beta}.")
        self.m, self.beta, self.lam = int(m), float(beta), float(lam)

    def init(self, z0: Tensor) -> _History:
        batch, dim = z0.shape
        zeros = z0.new_zeros(batch, self.m, dim)
        return _History(zeros, zeros.clone(), z0.new_zeros(batch, self.m, self.m))

    def step(self, memory: _History, z: Tensor, fz: Tensor) -> Tensor:
        slot = memory.count % self.m
        memory.count += 1
        n = min(memory.count, self.m)
        # Functional writes (not in-place) keep the history differentiable for unrolled backprop.
        memory.z = replace_row(memory.z, slot, z)
        memory.fz = replace_row(memory.fz, slot, fz)
        residuals = memory.fz[:, :n] - memory.z[:, :n]
        new_row = torch.bmm(residuals, (fz - z).unsqueeze(2)).squeeze(2)  # [B, n]
        gram = memory.gram.clone() if memory.gram.requires_grad else memory.gram
        gram[:, slot, :n] = new_row
        gram[:, :n, slot] = new_row
        memory.gram = gram
        alpha = _mixing_weights(gram[:, :n, :n], self.lam, newest=slot)  # [B, n]
        mixed_fz = torch.bmm(alpha.unsqueeze(1), memory.fz[:, :n]).squeeze(1)
        if self.beta == 1.0:
            return mixed_fz
        mixed_z = torch.bmm(alpha.unsqueeze(1), memory.z[:, :n]).squeeze(1)
        return self.beta * mixed_fz + (1.0 - self.beta) * mixed_z


def _mixing_weights(gram: Tensor, lam: float, newest: int) -> Tensor:
    """Per-sample weights ``alpha`` with ``sum(alpha) = 1`` minimising ``alpha^T (G + lam s I) alpha``.

    Solves the KKT system ``[[0, 1^T], [1, G + lam s I]] [mu, alpha] = [1, 0]`` with ``s`` the mean diagonal.
    A sample whose system is singular or non-finite (an exactly converged or NaN sample) takes the plain
    step instead (all weight on the newest iterate) rather than failing the whole batch.
    """
    batch, n, _ = gram.shape
    if n == 1:
        return gram.new_ones(batch, 1)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(gram.dtype).tiny ** 0.5)
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    kkt = gram.new_zeros(batch, n + 1, n + 1)
    kkt[:, 0, 1:] = 1.0
    kkt[:, 1:, 0] = 1.0
    kkt[:, 1:, 1:] = gram + (lam * scale)[:, None, None] * eye
    rhs = gram.new_zeros(batch, n + 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(kkt, rhs)
    alpha = solution[:, 1:]
    ok = (info == 0) & torch.isfinite(alpha).all(dim=1)
    plain = torch.zeros_like(alpha)
    plain[:, newest] = 1.0
    return torch.where(ok.unsqueeze(1), alpha, plain)
