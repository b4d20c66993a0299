"""``fixed_point``: solve ``z = f(z)`` without a graph, then attach the chosen gradient."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ._tree import State, flatten, spec_of, tree_map, unflatten
from .gradients import IFT, GradientEstimator
from .perturbation import Perturbation
from .solution import Path, Solution
from .solvers import Anderson, Solver

__all__ = ["Perturbation", "fixed_point"]


def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    solver: Solver | None = None,
    gradient: GradientEstimator | None = None,
    perturbation: Perturbation | None = None,
    capture: Iterable[int] = (),
) -> Solution:
    """Find ``z* = f(z*)`` from ``z0`` and return it with a gradient estimate attached.

    The solver runs under ``torch.no_grad()`` (except for :class:`~implicitkit.Unrolled`), so memory does
    not grow with its steps; the gradient estimator then rebuilds what backward needs from ``z*``. Gradients
    reach every parameter and input that ``f`` closes over.

    Arguments:
        f: maps a state to a state of the same structure: a tensor ``[B, ...]`` or a tuple/list/dict of
            tensors whose first dimension is the batch ``B``. Samples must not interact inside ``f``.
        z0: the starting state.
        solver: default ``Anderson()``.
        gradient: default ``IFT()``.
        perturbation: ``(state, step) -> state`` applied before each solver step (steps count from 1); pass it
            in training only (:class:`~implicitkit.DEQ` does this for you).
        capture: solver steps after which to keep the state for path supervision: ``Solution.path`` holds
            the state after each (ascending, ``Solution.path.steps``) passed through ``gradient``, built when
            accessed (see ``docs/path_supervision.md``).

    Returns:
        A :class:`Solution`: ``value, stats = fixed_point(...)``.
    """
    solver = solver if solver is not None else Anderson()
    gradient = gradient if gradient is not None else IFT()
    spec = spec_of(z0)

    def f_flat(z):
        return flatten(f(unflatten(z, spec)), spec)

    flat_perturbation = None
    if perturbation is not None:

        def flat_perturbation(z, step):
            return flatten(perturbation(unflatten(z, spec), step), spec)

    z0_flat = flatten(z0, spec)
    if gradient.unrolled:
        result = solver.solve(f_flat, z0_flat, perturbation=flat_perturbation, capture=capture)
    else:
        with torch.no_grad():
            result = solver.solve(f_flat, z0_flat.detach(), perturbation=flat_perturbation, capture=capture)

    def attach(z_flat):
        z = unflatten(z_flat, spec)
        if gradient.unrolled or not torch.is_grad_enabled():
            return z
        return gradient.attach(f, tree_map(lambda x: x.detach(), z), solution.backward_stats.append)

    path = Path(sorted(result.captured), lambda k: attach(result.captured[k]), shared_graph=gradient.unrolled)
    solution = Solution(None, result.stats, path)
    solution.value = attach(result.value)
    return solution
