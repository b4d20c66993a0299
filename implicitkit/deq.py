"""``DEQ``: any ``nn.Module`` cell as an implicit layer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from torch import nn

from ._compile import not_compiled
from ._tree import State
from .functional import Perturbation, check_parts, fixed_point
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
        check_parts(solver, gradient, perturbation)
        self.cell = cell
        self.solver = solver
        self.gradient = gradient
        self.perturbation = perturbation
        self.has_aux = has_aux
        self._warned_of_layers = False

    @not_compiled  # the solve and its gradient in one graph break (see functional.py)
    def forward(self, z0: State, *inputs, capture: Iterable[int] = ()) -> Solution:
        """Solve ``z = cell(z, *inputs)`` from ``z0``; ``value`` is built here, where DDP looks for it."""
        if self.training and not self._warned_of_layers and isinstance(self.cell, nn.Module):
            self._warned_of_layers = _warn_of_layers_that_change_per_step(self.cell)
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


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _warn_of_layers_that_change_per_step(cell: nn.Module) -> bool:
    """Warn of layers in training mode that make the cell another map at every solver step; True if any.

    ``nn.Dropout`` draws a new mask at each application, so the solve chases a moving target; BatchNorm
    normalises by the batch's statistics (samples are no longer solved independently) and updates its
    running statistics at every application, so they end up those of the last few solver steps.
    """
    found = [
        f"{name or 'the cell'} ({type(m).__name__})"
        for name, m in cell.named_modules()
        if m.training
        and ((isinstance(m, _DROPOUTS) and m.p > 0) or isinstance(m, nn.modules.batchnorm._BatchNorm))
    ]
    if found:
        warnings.warn(
            f"The DEQ's cell holds layers that change the map at every solver step in training mode: "
            f"{', '.join(found)}. Dropout draws a new mask per application: use ik.VariationalDropout (one mask "
            "per solve). BatchNorm mixes the samples of a batch (and, tracking statistics, updates them at "
            "every step): use GroupNorm or LayerNorm, or keep the BatchNorm in eval mode. (Warned once per DEQ.)",
            UserWarning,
            stacklevel=3,
        )
    return bool(found)
