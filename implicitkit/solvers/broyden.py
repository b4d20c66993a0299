"""Limited-memory ("good") Broyden's method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._settings import as_count
from .base import Solver, replace_row


@dataclass
class _InverseJacobian:
    """``H = -I + sum_{i < count} u_i v_i^T``, an approximation of ``(J - I)^-1``, stored as rank-one factors."""

    u: Tensor  # [B, m, D]; rows at and after ``count`` are unused
    v: Tensor  # [B, m, D]
    prev_z: Tensor | None = None
    prev_g: Tensor | None = None
    inv_scale: Tensor | None = None  # [B, 1] 1 / max |g_1|: secant pairs are stored scaled (see step)
    count: int = 0

    def apply(self, x: Tensor) -> Tensor:
        """``H x`` per sample."""
        return _minus_identity_plus(x, self.v[:, : self.count], self.u[:, : self.count])

    def apply_transposed(self, x: Tensor) -> Tensor:
        """``x^T H`` per sample."""
        return _minus_identity_plus(x, self.u[:, : self.count], self.v[:, : self.count])


def _minus_identity_plus(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``-x + sum_i (a_i . x) b_i`` per sample, for ``x`` ``[B, D]`` and factors ``a``, ``b`` ``[B, n, D]``."""
    if a.shape[1] == 0:
        return -x
    # Both products keep their operands in the layouts CPU bmm handles without a per-sample loop.
    coef = torch.bmm(x.unsqueeze(1), a.transpose(1, 2))  # [B, 1, n]
    return torch.baddbmm(x.unsqueeze(1), coef, b, beta=-1).squeeze(1)


class Broyden(Solver):
    """Quasi-Newton root finding on ``g(z) = f(z) - z`` with Broyden's "good" inverse update.

    Steps ``z_{k+1} = z_k - H_k g(z_k)`` with ``H_0 = -I`` (so the first step is plain iteration) and

    ``H_{k+1} = H_k + (s - H_k y) s^T H_k / (s^T H_k y)``,  ``s = z_{k+1} - z_k``,  ``y = g_{k+1} - g_k``,

    kept as at most ``m`` rank-one factors per sample. When the memory is full it restarts from ``H = -I``:
    overwriting the oldest factor instead leaves a product of updates no secant condition supports, and is
    unstable in practice. An update whose denominator vanishes (a frozen sample, a degenerate step) is skipped.

    Arguments:
        m: number of rank-one updates kept.
        **kwargs: ``tol``, ``max_iter``, ``stop_mode``, ``on_failure``, ``divergence_factor`` of :class:`Solver`.

    Reference: Broyden, "A class of methods for solving nonlinear simultaneous equations", 1965.
    """

    def __init__(self, *, m: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        m = as_count("m", m)
        if m < 1:
            raise ValueError(f"memory m must be at least 1, got {m}.")
        self.m = m

    def init(self, z0: Tensor) -> _InverseJacobian:
        batch, dim = z0.shape
        return _InverseJacobian(z0.new_zeros(batch, self.m, dim), z0.new_zeros(batch, self.m, dim))

    def step(self, memory: _InverseJacobian, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if memory.inv_scale is None:
            # H does not change when s and y are scaled by one constant per sample; scaling by the first
            # residual's largest entry keeps their products finite for states near 1e20.
            scale = torch.linalg.vector_norm(g.detach(), ord=torch.inf, dim=1, keepdim=True)
            memory.inv_scale = torch.where(scale > 0, scale, 1.0).reciprocal()
        if memory.prev_z is not None:
            s = torch.sub(z, memory.prev_z).mul_(memory.inv_scale)  # in place: fewer large temporaries
            y = torch.sub(g, memory.prev_g).mul_(memory.inv_scale)
            h_y = memory.apply(y)
            s_h = memory.apply_transposed(s)
            denom = torch.linalg.vecdot(s_h, y, dim=1).unsqueeze(1)
            tiny = torch.finfo(z.dtype).eps * (s.norm(dim=1, keepdim=True) * y.norm(dim=1, keepdim=True))
            # A skipped update (vanishing denominator) gets scale 1/inf = 0: a zero rank-one term (and, unrolled,
            # a zero gradient rather than the NaN of 0 * d(1/denom)).
            scale = torch.where(denom.abs() > tiny, denom, torch.inf).reciprocal()
            if memory.count == self.m:  # restart; see the class docstring
                memory.count = 0
            memory.u = replace_row(memory.u, memory.count, torch.sub(s, h_y).mul_(scale))
            memory.v = replace_row(memory.v, memory.count, s_h)
            memory.count += 1
        memory.prev_z, memory.prev_g = z, g
        return z - memory.apply(g)
