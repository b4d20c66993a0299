"""The gradient-estimator protocol: how the solve runs, and how a gradient is attached to its result."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .._settings import settings_repr
from .._tree import State, StateSpec, unflatten
from ..solvers import Solver, SolveResult, iterate
from ..solvers.loop import FlatMap, FlatPerturbation
from ..stats import SolverStats
from .tangent import primals_only

Map = Callable[[State], State]
AuxMap = Callable[[State], "tuple[State, Any]"]  # f with has_aux: state -> (state, aux)
VJP = Callable[[Tensor], Tensor]
Recorder = Callable[[SolverStats], None]


class GradientEstimator(ABC):
    """Decides how the forward solve runs and what gradient its result carries.

    With ``g = dL/dz*`` and ``J = df/dz`` at ``z*``, the exact gradient is ``g (I - J)^-1 df/dtheta``; each
    estimator replaces ``(I - J)^-1`` by something cheaper (see ``docs/gradients.md``).

    - :meth:`solve` runs the solver; by default without autograd, so memory does not grow with its steps
      (:class:`~implicitkit.Unrolled` overrides it to backprop through the steps).
    - :meth:`attach` maps a solver state to the estimator's output: its forward value (``z*`` for IFT,
      ``f(f(z*))`` for RAG(2)) is the same with or without autograd; with autograd it carries the gradient.

    An estimator whose backward is ``u df/dtheta`` for an adjoint ``u`` that is a fixed polynomial in ``J``
    is a :class:`PolynomialAdjoint` (JFB, Neumann): :class:`~implicitkit.IFT` can use it as a fallback.
    """

    def solve(
        self,
        solver: Solver,
        f: FlatMap,
        z0: Tensor,
        *,
        perturbation: FlatPerturbation | None = None,
        capture: Iterable[int] = (),
    ) -> SolveResult:
        """Run ``solver`` on the flat map from ``z0``; here without autograd, and on primals in forward mode."""
        with torch.no_grad(), primals_only():
            return iterate(solver, f, z0.detach(), perturbation=perturbation, capture=capture)

    @abstractmethod
    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        """The estimator's output at a solver state ``z_star``, with its gradient when autograd is on.

        Arguments:
            f: the map ``z -> f(z, x; theta)`` with autograd to its parameters and inputs.
            z_star: the state the solve returned (detached unless :meth:`solve` kept a graph).
            record: called with the stats of any solve done in the backward pass (IFT's adjoint solve).
        """

    def attach_with_aux(self, f: AuxMap, z_star: State, record: Recorder | None = None) -> tuple[State, Any]:
        """:meth:`attach` for a map that also returns an auxiliary output: ``(output, aux)``.

        Here ``aux`` comes from one more evaluation of ``f`` at the estimator's output, with its graph:
        ``aux(f(attach(z*)))``. For IFT, Neumann and Unrolled, whose output is ``z*`` itself, that is the aux
        at the fixed point, and a loss on it is differentiated through ``z*`` by the estimator's own rule.
        Estimators whose output is an application of ``f`` (JFB, Phantom, RAG) override it to return the aux
        of their last grad-attached application instead, at no extra cost.
        """
        value = self.attach(lambda z: f(z)[0], z_star, record)
        return value, f(value)[1]

    def attach_result(
        self, f: Map, result: SolveResult, step: int | None, spec: StateSpec, record: Recorder | None = None
    ) -> State:
        """The estimator's output for a solve's value (``step=None``) or for its state captured after ``step``.

        By default :meth:`attach` at that state. An estimator whose :meth:`solve` keeps more than the state
        (:class:`~implicitkit.Reversible`: the partner state and the step count) reads it from ``result`` here.
        """
        z_flat = result.value if step is None else result.captured[step]
        return self.attach(f, unflatten(z_flat, spec), record)

    def attach_result_with_aux(
        self, f: AuxMap, result: SolveResult, spec: StateSpec, record: Recorder | None = None
    ) -> tuple[State, Any]:
        """:meth:`attach_with_aux` for a solve's value; by default at ``result.value`` (see :meth:`attach_result`)."""
        return self.attach_with_aux(f, unflatten(result.value, spec), record)

    def __repr__(self) -> str:
        return settings_repr(self)


class PolynomialAdjoint(GradientEstimator):
    """An estimator whose gradient is ``u df/dtheta`` with ``u = g P(J)`` for a fixed polynomial ``P``.

    Such an estimator can stand in for the samples whose IFT adjoint solve failed
    (``IFT(on_failure=JFB())``), since its adjoint needs only VJPs at ``z*``.
    """

    @abstractmethod
    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        """The adjoint ``u`` (flat ``[B, D]``) such that this estimator's gradient is ``u df/dtheta``."""

    @abstractmethod
    def tangent_vector(self, b: Tensor, jvp: VJP) -> Tensor:
        """The forward-mode twin of :meth:`adjoint_vector`: ``t = P(J) b`` for ``b = (df/dtheta) t_theta``."""


class LastAux:
    """``f`` without its aux, remembering the aux of its latest call (for estimators that apply ``f``)."""

    def __init__(self, f: AuxMap) -> None:
        self._f = f
        self.aux: Any = None

    def __call__(self, z: State) -> State:
        state, self.aux = self._f(z)
        return state
