"""``DEQ``: any ``nn.Module`` cell as an implicit layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ._tree import State
from .functional import Perturbation, fixed_point
from .gradients import GradientEstimator
from .layers import new_solve
from .solution import Solution
from .solvers import Solver


class DEQ(nn.Module):
    """Wrap a cell ``f(z, *inputs)`` as a deep-equilibrium layer: ``deq(z0, *inputs)`` solves ``z = f(z, *inputs)``.

    The perturbation, if any, is applied only in training mode. Solver and estimator are plain
    configuration objects and can be swapped at any time (for example more solver steps at test time).
    Each forward starts a new solve for the cell's per-solve layers (:class:`~implicitkit.VariationalDropout`,
    :func:`~implicitkit.weight_norm`, :func:`~implicitkit.spectral_norm`): one mask and one normalised weight
    serve every application of the cell that belongs to this solve, backward and path branches included
    (:meth:`~implicitkit.Path.stacked`'s map too). Those layers are found among the cell's submodules, so a
    cell that uses them must be an ``nn.Module`` holding them, not a function or lambda. A DEQ inside another
    DEQ's cell keeps the outer solve's masks and weights.

    Arguments:
        cell: an ``nn.Module`` (or callable) taking the state first and any inputs after it; it returns a new
            state (one that writes into its input state is refused).
        solver: default ``Anderson()``.
        gradient: default ``IFT()``.
        perturbation: ``(state, step) -> state``, used in training mode only.
        has_aux: the cell returns ``(state, aux)``; ``Solution.aux`` holds the aux (see
            :func:`~implicitkit.fixed_point`).

    Example::

        deq = DEQ(cell, solver=Anderson(tol=1e-4, max_iter=30), gradient=IFT())
        z, stats = deq(torch.zeros_like(x), x)
    """

    def __init__(
        self,
        cell: nn.Module,
        *,
        solver: Solver | None = None,
        gradient: GradientEstimator | None = None,
        perturbation: Perturbation | None = None,
        has_aux: bool = False,
    ) -> None:
        super().__init__()
        self.cell = cell
        self.solver = solver
        self.gradient = gradient
        self.perturbation = perturbation
        self.has_aux = has_aux

    @torch.compiler.disable  # the solve and its gradient in one graph break (see functional.py)
    def forward(self, z0: State, *inputs, capture: Iterable[int] = ()) -> Solution:
        """Solve ``z = cell(z, *inputs)`` from ``z0``; ``value`` is built here, where DDP looks for it."""
        scope = new_solve(self.cell) if isinstance(self.cell, nn.Module) else None
        f = lambda z: self.cell(z, *inputs)  # noqa: E731
        sol = fixed_point(
            f if scope is None else scope.bind(f),
            z0,
            solver=self.solver,
            gradient=self.gradient,
            perturbation=self.perturbation if self.training else None,
            capture=capture,
            has_aux=self.has_aux,
        )
        if scope is not None:
            sol.path._bind_maps(scope.bind)  # Path.stacked's map too sees this solve's masks and weights
        sol.value  # noqa: B018 (a module's output must hold its tensors when forward returns)
        return sol

    def extra_repr(self) -> str:
        aux = ", has_aux=True" if self.has_aux else ""
        return f"solver={self.solver!r}, gradient={self.gradient!r}, perturbation={self.perturbation!r}{aux}"
