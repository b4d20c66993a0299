"""Anderson acceleration (type II, regularised least squares)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._settings import as_count
from .base import Solver, replace_row


@dataclass
class _AndersonMemory:
    fz: Tensor  # [B, m, D] images f(z_i) of the last m iterates
    g: Tensor  # [B, m, D] their residuals f(z_i) - z_i
    ones: Tensor  # [B, m, 1] right-hand side of the weights' linear system
    eye: Tensor  # [m, m] identity; its column i is the plain step's weights (all on iterate i)
    inv_scale: Tensor | None = None  # [B, 1] 1 / max |G_1|: residuals are stored scaled (see step)
    count: int = 0


class Anderson(Solver):
    """Anderson acceleration: mix the last ``m`` iterates to cancel their residuals.

    With residuals ``G_i = f(z_i) - z_i`` of the last ``n <= m`` steps, each step solves, per sample,

    ``alpha = argmin ||sum_i alpha_i G_i||^2 + lam ||alpha||^2   subject to   sum_i alpha_i = 1``

    and moves to ``z_{k+1} = beta sum_i alpha_i f(z_i) + (1 - beta) sum_i alpha_i z_i``. The constrained
    problem has the closed form ``alpha = y / sum(y)`` with ``(G G^T + lam s I) y = 1`` (``G`` the ``n x D``
    residual history), solved in at least float32. ``lam`` is relative to the Gram matrix's mean diagonal
    ``s``, so the step does not depend on the scale of the state.

    Arguments:
        m: history size.
        beta: mixing (1 takes the images only).
        lam: Tikhonov regularisation of the least-squares problem, relative to its scale (finite, >= 0).
        **kwargs: ``tol``, ``max_iter``, ``stop_mode``, ``on_failure``, ``divergence_factor`` of :class:`Solver`.

    Reference: Walker & Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011.
    """

    def __init__(self, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4, **kwargs) -> None:
        super().__init__(**kwargs)
        m = as_count("m", m)
        if m < 1:
            raise ValueError(f"history size m must be at least 1, got {m}.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must lie in (0, 1], got {beta}.")
        # NaN or inf empties the least-squares step; a negative lam makes it indefinite.
        if not 0.0 <= lam < math.inf:
            raise ValueError(f"lam must be a finite number >= 0 (the default 1e-4), got {lam}.")
        self.m, self.beta, self.lam = m, float(beta), float(lam)

    def init(self, z0: Tensor) -> _AndersonMemory:
        batch, dim = z0.shape
        m = self.m
        return _AndersonMemory(
            fz=z0.new_zeros(batch, m, dim),
            g=z0.new_zeros(batch, m, dim),
            ones=z0.new_ones(batch, m, 1),
            eye=torch.eye(m, dtype=z0.dtype, device=z0.device),
        )

    def step(self, memory: _AndersonMemory, z: Tensor, fz: Tensor) -> Tensor:
        slot = memory.count % self.m
        memory.count += 1
        n = min(memory.count, self.m)
        g = fz - z
        if memory.inv_scale is None:
            # The weights do not change when every residual of a sample is scaled by one constant; scaling
            # by the first residual's largest entry keeps the Gram matrix finite for states near 1e20.
            scale = torch.linalg.vector_norm(g.detach(), ord=torch.inf, dim=1, keepdim=True)
            memory.inv_scale = torch.where(scale > 0, scale, 1.0).reciprocal()
        # Functional writes (not in-place) keep the history differentiable for unrolled backprop.
        memory.fz = replace_row(memory.fz, slot, fz)
        memory.g = replace_row(memory.g, slot, g * memory.inv_scale)
        if n == 1:  # a single iterate: the plain (damped) step
            return fz if self.beta == 1.0 else z + self.beta * g
        history = memory.g[:, :n]
        # One bmm for the whole Gram matrix costs no more on small n than one row and two scattered writes.
        gram = torch.bmm(history, history.mT)
        eye = memory.eye[:n, :n]
        alpha = _mixing_weights(gram, self.lam, memory.ones[:, :n], eye, eye[:, slot : slot + 1])
        alpha = alpha.mT  # [B, 1, n]
        mixed = torch.bmm(alpha, memory.fz[:, :n]).squeeze(1)
        if self.beta == 1.0:
            return mixed
        # sum_i alpha_i z_i = sum_i alpha_i (f(z_i) - G_i)
        return mixed - (1.0 - self.beta) * torch.bmm(alpha, history).squeeze(1) / memory.inv_scale


def _mixing_weights(gram: Tensor, lam: float, ones: Tensor, eye: Tensor, plain: Tensor) -> Tensor:
    """Weights ``alpha`` ``[B, n, 1]`` with ``sum(alpha) = 1`` minimising ``alpha^T (G + lam s I) alpha``.

    The minimiser is ``y / sum(y)`` with ``(G + lam s I) y = 1`` and ``s`` the mean diagonal of ``G``. For
    ``lam > 0`` the system is positive definite for every finite ``G``, so ``sum(y) > 0``; a sample with a
    non-finite ``G`` has already been stopped by the loop, which discards its proposal. With ``lam = 0`` a
    sample whose system is singular takes the ``plain`` weights ``[n, 1]`` (all on the newest iterate)
    instead of failing the whole batch.
    """
    n = gram.shape[-1]
    trace = gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    reg = torch.add(torch.finfo(gram.dtype).tiny ** 0.5, trace, alpha=lam / n)
    system = torch.addcmul(gram, reg[:, None, None], eye)
    # A [B, n, 1] right-hand side comes back in a layout bmm takes without a slow per-sample loop.
    y, _ = torch.linalg.solve_ex(system, ones)
    total = y.sum(dim=1, keepdim=True)
    if lam > 0:
        return y / total
    ok = total > 0  # False for a singular system's inf or NaN
    if torch.is_grad_enabled():
        # Under autograd (Unrolled) the discarded branch's NaN would reach the gradient (0 * NaN): solve a
        # harmless system in its place, so that neither branch of the where is non-finite.
        y, _ = torch.linalg.solve_ex(torch.where(ok, system, eye), ones)
        total = y.sum(dim=1, keepdim=True)
    return torch.where(ok, y / total, plain)
