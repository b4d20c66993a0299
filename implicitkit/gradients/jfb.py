"""Jacobian-free backpropagation."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .._tree import State, tree_map
from .base import VJP, AuxMap, LastAux, Map, PolynomialAdjoint, Recorder


class JFB(PolynomialAdjoint):
    """One grad-attached application of the map at the detached fixed point: ``z = f(sg(z*))``.

    Replaces ``(I - J)^-1`` by ``I``, so the gradient is ``g df/dtheta``; exact when ``J = 0`` and a descent
    direction when ``||J|| < 1`` is small enough. Equals ``Phantom(k=1, tau=1)``.

    Reference: Fung et al., "JFB: Jacobian-free backpropagation for implicit networks", AAAI 2022.
    """

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return f(tree_map(lambda x: x.detach(), z_star))

    def attach_with_aux(self, f: AuxMap, z_star: State, record: Recorder | None = None) -> tuple[State, Any]:
        """The output ``f(sg(z*))`` and the aux of that same application."""
        f_state = LastAux(f)
        return self.attach(f_state, z_star, record), f_state.aux

    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        return g

    def tangent_vector(self, b: Tensor, jvp: VJP) -> Tensor:
        return b
