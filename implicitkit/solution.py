"""The result of a fixed-point solve: value, stats, supervised path and backward stats."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ._tree import State
from .stats import SolverStats


class Path(Sequence):
    """States after chosen solver steps, each passed through the gradient estimator when accessed.

    Branches are built lazily, one graph per access, so a training loop that back-propagates each branch's
    loss before touching the next keeps at most one branch graph alive::

        for step, z in zip(sol.path.steps, sol.path):
            loss(z).backward()
    """

    def __init__(self, steps: Sequence[int], make_branch: Callable[[int], State]) -> None:
        self.steps = tuple(steps)
        self._make_branch = make_branch

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._make_branch(k) for k in self.steps[index]]
        return self._make_branch(self.steps[index])

    def __repr__(self) -> str:
        return f"Path(steps={self.steps})"


class Solution:
    """What :func:`~implicitkit.fixed_point` returns; unpacks as ``value, stats = solution``.

    Attributes:
        value: the fixed point with the estimator's gradient attached (same structure as ``z0``).
        stats: the forward solve's :class:`SolverStats` (per-sample ``nstep``, ``residual``, ``converged``,
            ``trace``).
        path: the states after the requested ``capture`` steps (:class:`Path`), empty when none were asked.
        backward_stats: stats of every adjoint solve run by backward passes through this solution (IFT),
            appended as they happen.
    """

    def __init__(self, value: State, stats: SolverStats, path: Path) -> None:
        self.value = value
        self.stats = stats
        self.path = path
        self.backward_stats: list[SolverStats] = []

    def __iter__(self) -> Iterator:
        yield self.value
        yield self.stats

    def __repr__(self) -> str:
        return f"Solution({self.stats.summary()}, path={self.path.steps})"
