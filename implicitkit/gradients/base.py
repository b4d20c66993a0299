"""The gradient-estimator protocol: how the solve runs, and how a gradient is attached to its result."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .._tree import State, StateSpec, unflatten
from ..solvers import Solver, SolveResult, iterate
from ..solvers.loop import FlatMap, FlatPerturbation
from ..stats import SolverStats

Map = Callable[[State], State]
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
        """Run ``solver`` on the flat map from ``z0``; here without autograd."""
        with torch.no_grad():
            return iterate(solver, f, z0.detach(), perturbation=perturbation, capture=capture)

    @abstractmethod
    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        """The estimator's output at a solver state ``z_star``, with its gradient when autograd is on.

        Arguments:
            f: the map ``z -> f(z, x; theta)`` with autograd to its parameters and inputs.
            z_star: the state the solve returned (detached unless :meth:`solve` kept a graph).
            record: called with the stats of any solve done in the backward pass (IFT's adjoint solve).
        """

    def attach_result(
        self, f: Map, result: SolveResult, step: int | None, spec: StateSpec, record: Recorder | None = None
    ) -> State:
        """The estimator's output for a solve's value (``step=None``) or for its state captured after ``step``.

        By default :meth:`attach` at that state. An estimator whose :meth:`solve` keeps more than the state
        (:class:`~implicitkit.Reversible`: the partner state and the step count) reads it from ``result`` here.
        """
        z_flat = result.value if step is None else result.captured[step]
        return self.attach(f, unflatten(z_flat, spec), record)

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if not k.startswith("_")]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"


class PolynomialAdjoint(GradientEstimator):
    """An estimator whose gradient is ``u df/dtheta`` with ``u = g P(J)`` for a fixed polynomial ``P``.

    Such an estimator can stand in for the samples whose IFT adjoint solve failed
    (``IFT(on_failure=JFB())``), since its adjoint needs only VJPs at ``z*``.
    """

    @abstractmethod
    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        """The adjoint ``u`` (flat ``[B, D]``) such that this estimator's gradient is ``u df/dtheta``."""
