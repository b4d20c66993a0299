"""Backpropagation through every solver step, optionally with checkpointed segments."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

from .._settings import as_count
from .._tree import State
from ..solvers import Solver, SolveResult, iterate
from ..solvers.loop import FlatMap, FlatPerturbation
from .base import GradientEstimator, Map, Recorder


class Unrolled(GradientEstimator):
    """Differentiate the solver's own iterations: exact for the steps taken.

    The solve runs in the caller's grad mode, so with autograd on its history and mixing weights are part
    of the graph; ``attach`` then has nothing to add. At convergence the gradient equals :class:`IFT`'s; use
    it as the reference the cheaper estimators are judged against. Its graph is ordinary autograd, so
    higher-order gradients are exact too. Unroll :class:`~implicitkit.FixedPointIteration`: differentiating
    Anderson's least-squares weights is numerically poor on hard problems.

    Memory grows with the steps ``n``: every step's graph of ``f`` (and the solver's history) is kept. With
    ``checkpoint_every=k`` only the loop's state every ``k`` steps is kept (the solver's memory included, so
    Anderson and Broyden are checkpointed too); backward replays each segment of ``k`` steps with autograd
    from its start, last segment first, so memory holds ``n / k`` states plus ``k`` graphs of ``f``, for one
    more forward pass of work. The replay repeats the forward's operations on the same values, so the
    gradient is exactly the plain unrolled one. Randomness inside the map (dropout) is replayed from the
    global generator's saved state; a replay that does not reproduce its segment's forward pass (a
    ``torch.Generator`` of the cell's own, a solver that mutates its memory in place) raises an error.
    The replay builds an ordinary graph, so second derivatives stay exact.

    Arguments:
        checkpoint_every: segment length ``k`` in steps; ``None`` (default) keeps every step's graph.
            ``sqrt(n)`` balances the two terms when a state and a graph of ``f`` cost about the same.
    """

    def __init__(self, checkpoint_every: int | None = None) -> None:
        if checkpoint_every is not None:
            checkpoint_every = as_count("checkpoint_every", checkpoint_every)
            if checkpoint_every < 1:
                raise ValueError(
                    "checkpoint_every must be a positive number of steps, or None to keep every step's graph; "
                    f"got {checkpoint_every!r}."
                )
        self.checkpoint_every = checkpoint_every

    def solve(
        self,
        solver: Solver,
        f: FlatMap,
        z0: Tensor,
        *,
        perturbation: FlatPerturbation | None = None,
        capture: Iterable[int] = (),
    ) -> SolveResult:
        return iterate(
            solver, f, z0, perturbation=perturbation, capture=capture, checkpoint_every=self.checkpoint_every
        )

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        return z_star
