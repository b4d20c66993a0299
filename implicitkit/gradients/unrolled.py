"""Backpropagation through every solver step."""

from __future__ import annotations

from .._tree import State
from .base import GradientEstimator, Map, Recorder


class Unrolled(GradientEstimator):
    """Differentiate the solver's own iterations: exact for the steps taken, memory linear in steps.

    The solver runs with autograd on, so its history and mixing weights are part of the graph; ``attach``
    then has nothing to add. At convergence the gradient equals :class:`IFT`'s; use it as the reference the
    cheaper estimators are judged against, not for training large models.
    """

    unrolled = True

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return z_star
