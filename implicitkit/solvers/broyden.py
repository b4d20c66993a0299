"""Limited-memory ("good") Broyden's method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Solver, replace_row


@dataclass
class _InverseJacobian:
    """``H = -I + sum_i u_i v_i^T``, an approximation of ``(J - I)^-1``, stored as rank-one factors."""

    u: Tensor  # [B, m, D]
    v: Tensor  # [B, m, D]
    prev_z: Tensor | None = None
    prev_g: Tensor | None = None
    count: int = 0

    def apply(self, x: Tensor) -> Tensor:
        """``H x`` per sample."""
        return -x + torch.bmm((self.v @ x.unsqueeze(2)).transpose(1, 2), self.u).squeeze(1)

    def apply_transposed(self, x: Tensor) -> Tensor:
        """``x^T H`` per sample."""
        return -x + torch.bmm((self.u @ x.unsqueeze(2)).transpose(1, 2), self.v).squeeze(1)


class Broyden(Solver):
    """Quasi-Newton root finding on ``g(z) = f(z) - z`` with Broyden's "good" inverse update.

    Steps ``z_{k+1} = z_k - H_k g(z_k)`` with ``H_0 = -I`` (so the first step is plain iteration) and

    ``H_{k+1} = H_k + (s - H_k y) s^T H_k / (s^T H_k y)``,  ``s = z_{k+1} - z_k``,  ``y = g_{k+1} - g_k``,

    kept as at most ``m`` rank-one factors per sample. When the memory is full it restarts from ``H = -I``:
    overwriting the oldest factor instead leaves a product of updates no secant condition supports, and is
    unstable in practice. An update whose denominator vanishes (a frozen sample, a degenerate step) is skipped.

    Arguments:
        m: number of rank-one updates kept.
        **kwargs: ``tol``, ``max_iter``, ``stop_mode``, ``throw``, ``divergence_factor`` of :class:`Solver`.

    Reference: Broyden, "A class of methods for solving nonlinear simultaneous equations", 1965.
    """

    def __init__(self, *, m: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        if m < 1:
            raise ValueError(f"memory m must be at least 1, got {m}.")
        self.m = int(m)

    def init(self, z0: Tensor) -> _InverseJacobian:
        batch, dim = z0.shape
        return _InverseJacobian(z0.new_zeros(batch, self.m, dim), z0.new_zeros(batch, self.m, dim))

    def step(self, memory: _InverseJacobian, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if memory.prev_z is not None:
            s = z - memory.prev_z
            y = g - memory.prev_g
            h_y = memory.apply(y)
            s_h = memory.apply_transposed(s)
            denom = (s_h * y).sum(dim=1, keepdim=True)
            tiny = torch.finfo(z.dtype).eps * (s.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True))
            usable = denom.abs() > tiny
            u_new = torch.where(usable, (s - h_y) / torch.where(usable, denom, torch.ones_like(denom)), 0.0)
            v_new = torch.where(usable, s_h, 0.0)
            if memory.count == self.m:  # restart; see the class docstring
                memory.u, memory.v, memory.count = torch.zeros_like(memory.u), torch.zeros_like(memory.v), 0
            memory.u = replace_row(memory.u, memory.count, u_new)
            memory.v = replace_row(memory.v, memory.count, v_new)
            memory.count += 1
        memory.prev_z, memory.prev_g = z, g
        return z - memory.apply(g)
