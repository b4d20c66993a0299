"""Truncated Neumann series for the inverse of ``I - J``."""

from __future__ import annotations

from torch import Tensor

from .._tree import State
from .adjoint import attach_adjoint
from .base import VJP, Map, PolynomialAdjoint, Recorder


class Neumann(PolynomialAdjoint):
    """``u = g sum_{t=0}^{k} J^t`` with ``J`` frozen at ``z*``, by ``k`` vector-Jacobian products.

    The series converges to ``g (I - J)^-1`` when the spectral radius of ``J`` is below one; unlike Phantom it
    evaluates every power of the same Jacobian, so it needs one forward application of f, not ``k``. Its
    forward value is ``z*``. Second derivatives through it are refused (see :class:`IFT`).

    Arguments:
        k: highest power of ``J`` kept (``k = 0`` is JFB).

    Reference: Liao et al., "Reviving and improving recurrent back-propagation", ICML 2018.
    """

    def __init__(self, k: int = 5) -> None:
        if k < 0:
            raise ValueError(f"Neumann needs k >= 0 terms, got {k}.")
        self.k = int(k)

    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        term, total = g, g
        for _ in range(self.k):
            term = vjp(term)
            total = total + term
        return total

    def tangent_vector(self, b: Tensor, jvp: VJP) -> Tensor:
        return self.adjoint_vector(b, jvp)  # the same polynomial, in J from the right: sum_t J^t b

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return attach_adjoint(f, z_star, self.adjoint_vector, repr(self), self.tangent_vector)
