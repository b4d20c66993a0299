"""Phantom gradients: a few damped unrolled steps from the detached fixed point."""

from __future__ import annotations

from typing import Any

from .._settings import as_count
from .._tree import State, tree_map
from .base import AuxMap, GradientEstimator, LastAux, Map, Recorder


class Phantom(GradientEstimator):
    """Unroll ``z <- (1 - tau) z + tau f(z)`` ``k`` times from ``sg(z*)`` with autograd.

    Replaces ``(I - J)^-1`` by ``tau sum_{t<k} (tau J + (1 - tau) I)^t``, which tends to the exact inverse as
    ``k`` grows when the damped iteration contracts. Costs ``k`` applications of f forward and backward and
    memory for ``k`` graphs, independent of the solver's step count.

    Arguments:
        k: number of unrolled steps.
        tau: damping in ``(0, 1]``.

    Reference: Geng et al., "On training implicit models", NeurIPS 2021 (k = 5, tau = 0.5).
    """

    def __init__(self, k: int = 5, tau: float = 0.5) -> None:
        k = as_count("k", k)
        if k < 1:
            raise ValueError(f"Phantom needs k >= 1 unrolled steps, got {k}.")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {tau}.")
        self.k, self.tau = k, float(tau)

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        z = tree_map(lambda x: x.detach(), z_star)
        for _ in range(self.k):
            fz = f(z)
            z = fz if self.tau == 1.0 else tree_map(lambda a, b: (1.0 - self.tau) * a + self.tau * b, z, fz)
        return z

    def attach_with_aux(self, f: AuxMap, z_star: State, record: Recorder | None = None) -> tuple[State, Any]:
        """The output and the aux of the last (the ``k``-th) grad-attached application of ``f``."""
        f_state = LastAux(f)
        return self.attach(f_state, z_star, record), f_state.aux
