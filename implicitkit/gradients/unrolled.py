"""Backpropagation through every solver step."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .._tree import State
from ..solvers import Solver, SolveResult, iterate
from ..solvers.loop import FlatMap, FlatPerturbation
from .base import GradientEstimator, Map, Recorder


class Unrolled(GradientEstimator):
    """Differentiate the solver's own iterations: exact for the steps taken, memory linear in steps.

    The solve runs in the caller's grad mode, so with autograd on its history and mixing weights are part
    of the graph; ``attach`` then has nothing to add. At convergence the gradient equals :class:`IFT`'s; use
    it as the reference the cheaper estimators are judged against, not for training large models. Its graph
    is ordinary autograd, so higher-order gradients are exact too. Unroll
    :class:`~implicitkit.FixedPointIteration`: differentiating Anderson's least-squares weights is
    numerically poor on hard problems.
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
        return iterate(solver, f, z0, perturbation=perturbation, capture=capture)

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return z_star
