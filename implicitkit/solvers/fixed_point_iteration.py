"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

from torch import Tensor

from .base import Solver


class FixedPointIteration(Solver):
    """Picard iteration ``z_{k+1} = (1 - beta) z_k + beta f(z_k)``.

    Converges linearly at the rate of ``J``'s spectral radius for a contraction. Damping replaces the
    iteration's Jacobian ``J`` by ``(1 - beta) I + beta J``, which pulls eigenvalues near ``-1`` (oscillating
    maps) back inside the unit disc at the price of slower progress along the others.

    Arguments:
        damping: ``beta`` in ``(0, 1]``; 1 is the plain iteration.
        **kwargs: ``tol``, ``max_iter``, ``stop_mode``, ``on_failure``, ``divergence_factor`` of :class:`Solver`.
    """

    def __init__(self, *, damping: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {damping}.")
        self.damping = float(damping)

    def init(self, z0: Tensor) -> None:
        return None

    def step(self, memory: None, z: Tensor, fz: Tensor) -> Tensor:
        if self.damping == 1.0:
            return fz
        return z + self.damping * (fz - z)
