"""Truncated Neumann series for the inverse of ``I - J``."""

from __future__ import annotations

from torch import Tensor

from .._settings import as_count
from .._tree import State
from .adjoint import attach_adjoint
from .base import VJP, Map, PolynomialAdjoint, Recorder
from .second_order import attach_twice_differentiable
from .tangent import attach_tangent


class Neumann(PolynomialAdjoint):
    """``u = g sum_{t=0}^{k} J^t`` with ``J`` frozen at ``z*``, by ``k`` vector-Jacobian products.

    The series converges to ``g (I - J)^-1`` when the spectral radius of ``J`` is below one; unlike Phantom it
    evaluates every power of the same Jacobian, so it needs one forward application of f, not ``k``. Its
    forward value is ``z*``. In forward mode its tangent is ``sum_{t<=k} J^t b`` for ``b = (df/dtheta) t_theta``.

    Second derivatives (``create_graph=True``) are refused unless ``second_order=True``: then they are the
    derivative of this estimator's own gradient ``g P(J) df/dtheta``, its VJPs taken with a graph and ``z*``
    differentiated as this estimator differentiates it (``P(J) df/dtheta``); they tend to the exact ones as
    ``k`` grows. The price is a second graph of ``f`` at ``z*`` in the forward pass.

    Arguments:
        k: highest power of ``J`` kept (``k = 0`` is JFB).
        second_order: make ``create_graph=True`` differentiate the estimator instead of refusing.

    Reference: Liao et al., "Reviving and improving recurrent back-propagation", ICML 2018.
    """

    def __init__(self, k: int = 5, *, second_order: bool = False) -> None:
        k = as_count("k", k)
        if k < 0:
            raise ValueError(f"Neumann needs k >= 0 terms, got {k}.")
        self.k = k
        self.second_order = bool(second_order)

    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        term, total = g, g
        for _ in range(self.k):
            term = vjp(term)
            total = total + term
        return total

    def tangent_vector(self, b: Tensor, jvp: VJP) -> Tensor:
        return self.adjoint_vector(b, jvp)  # the same polynomial, in J from the right: sum_t J^t b

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        if not self.second_order:
            return attach_adjoint(f, z_star, self.adjoint_vector, repr(self), self.tangent_vector)
        out = attach_twice_differentiable(
            f,
            z_star,
            self.adjoint_vector,
            self.adjoint_vector,
            lambda g, lin: self.adjoint_vector(g, lambda v: lin.vjp(v, create_graph=True)),
            repr(self),
        )
        return attach_tangent(f, z_star, out, self.tangent_vector, repr(self))
