"""The solver protocol: a strategy that proposes the next iterate; the loop that runs it is in ``loop.py``.

A solver holds configuration only (budget, stop rule, failure policy) and says how to propose the next
iterate from the current one and its image under the map (:meth:`Solver.init` and :meth:`Solver.step`).
Which samples are done is decided by one rule for all solvers (:meth:`Solver.continues`).
"""

from __future__ import annotations

from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._settings import as_count, public_settings, settings_repr
from ..stats import FAILURE_POLICIES, apply_failure_policy
from .loop import FlatMap, FlatPerturbation, SolveResult, iterate

_STOP_MODES = ("abs", "rel")


def replace_row(buffer: Tensor, slot: int, row: Tensor) -> Tensor:
    """``buffer[:, slot] = row``, out of place when autograd tracks either (unrolled backprop needs it)."""
    if buffer.requires_grad or row.requires_grad:
        buffer = buffer.clone()
    buffer[:, slot] = row
    return buffer


class _Frozen(ABCMeta):
    """Freezes an instance once its class's ``__init__`` has run: a solver's settings are fixed at construction."""

    def __call__(cls, *args, **kwargs):
        instance = super().__call__(*args, **kwargs)
        object.__setattr__(instance, "_frozen", True)
        return instance


class Solver(ABC, metaclass=_Frozen):
    """Finds ``z* = f(z*)`` for a batch of samples, each stopping on its own.

    Every sample ``b`` is iterated until its residual ``r_b = ||f(z_b) - z_b||`` (``stop_mode="abs"``) or
    ``r_b / (||f(z_b)|| + 1e-8)`` (``"rel"``; the constant keeps a fixed point at zero reachable, so for
    states of norm near 1e-8 or below ``"rel"`` is looser than its name: use ``"abs"`` with a ``tol`` of
    their scale) is at most ``tol``; from then on it is frozen. Samples do not interact
    in the solver's own arithmetic, so a sample's steps and value are those it would get alone, up to the
    round-off of the cell itself (a batched matmul may round differently from a single one, and an
    accelerated solver can amplify that difference). The value returned for a sample is ``f(z_k)`` at the step
    ``k`` with the lowest residual, never worse than the last.

    A sample is stopped and flagged when its map returns NaN/inf (``nonfinite``), or as ``diverged`` when its
    absolute residual or its state's norm grows past ``divergence_factor`` times its first value, or when its
    state grew 100-fold while its absolute residual fell by less than an eleventh (a map with no fixed point,
    such as ``z + 1``, iterated off to infinity, whose relative residual can meet ``tol`` by that growth). ``successful`` means a fixed point to ``tol``;
    it says nothing of stability: Anderson and Broyden can converge to a repelling fixed point (spectral
    radius of ``J`` above 1) that plain iteration would leave; check with :func:`~implicitkit.spectral_radius`.

    With ``tol=None`` the solve is a fixed count: every sample takes exactly ``max_iter`` steps, nothing is
    read back to the host during the loop, and only NaN/inf is reported as a failure.

    Settings are fixed at construction (assigning one raises); :meth:`replace` makes a changed copy.

    Arguments:
        tol: residual at which a sample counts as converged, or ``None`` for exactly ``max_iter`` steps.
        max_iter: most applications of the map per sample; the solve always returns after at most this many.
        stop_mode: ``"abs"`` or ``"rel"``, the residual the stop rule (and ``stats.residual``) uses.
        on_failure: what a failed sample leads to, in the vocabulary that :class:`~implicitkit.IFT` uses for
            the backward solve: ``"warn"`` (a :class:`~implicitkit.FixedPointWarning` with the counts, the
            cause and the fix, once per call site), ``"report"`` (in the stats only) or ``"raise"`` (a
            :class:`~implicitkit.FixedPointError`).
        throw: ``True`` is ``on_failure="raise"``.
        divergence_factor: how much the absolute residual, or the state's norm, may grow over its first value
            before the sample is declared diverged.
    """

    def __init__(
        self,
        *,
        tol: float | None = 1e-4,
        max_iter: int = 50,
        stop_mode: str = "rel",
        on_failure: str = "warn",
        throw: bool = False,
        divergence_factor: float = 1e4,
    ) -> None:
        if stop_mode not in _STOP_MODES:
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}.")
        max_iter = as_count("max_iter", max_iter)
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}.")
        if tol is not None and not tol >= 0:
            raise ValueError(f"tol must be non-negative, or None for a fixed step count, got {tol}.")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}.")
        # NaN too: every comparison with it fails, so each solve would stop after one step.
        if not divergence_factor > 1:
            raise ValueError(
                f"divergence_factor must be above 1 (inf: never diverged), got {divergence_factor}."
            )
        self.tol = None if tol is None else float(tol)
        self.max_iter = max_iter
        self.stop_mode = stop_mode
        self.on_failure = "raise" if throw else on_failure
        self.divergence_factor = float(divergence_factor)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"{type(self).__name__}'s settings are fixed at construction, so setting {name!r} would be "
                f"ignored or half-applied; make a changed copy instead: solver = solver.replace({name}=...)."
            )
        super().__setattr__(name, value)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this solver."""
        return public_settings(self)

    def replace(self, **changes: Any) -> Solver:
        """A copy with some settings changed, e.g. ``solver.replace(max_iter=100, on_failure="raise")``."""
        unknown = set(changes) - set(self.settings()) - {"throw"}
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no setting {sorted(unknown)}; it has {sorted(self.settings())}."
            )
        if changes.get("throw") is False and "on_failure" not in changes and self.on_failure == "raise":
            raise ValueError(
                "throw=False does not say what to do instead of raising: pass on_failure='warn' or 'report'."
            )
        return type(self)(**{**self.settings(), **changes})

    # -- what a concrete solver provides -------------------------------------------------------------
    @abstractmethod
    def init(self, z0: Tensor) -> Any:
        """Create the solver's memory (history, inverse-Jacobian factors) for a ``[B, D]`` start."""

    @abstractmethod
    def step(self, memory: Any, z: Tensor, fz: Tensor) -> Tensor:
        """Propose the next iterate from ``z`` and ``f(z)``, updating ``memory`` in place."""

    # -- the stop rule, the same for every solver ----------------------------------------------------
    def continues(self, residual: Tensor, abs_residual: Tensor, out: Tensor | None = None) -> Tensor:
        """``[B]`` bool, True for the samples that go on: those whose residual is above ``tol``.

        The loop also stops a sample whose absolute residual, or whose state's norm, grew past
        ``divergence_factor`` times its first; NaN fails every comparison, so a sample that produced NaN stops.
        """
        return torch.gt(residual, self.tol, out=out)

    def solve(
        self,
        f: FlatMap,
        z0: Tensor,
        *,
        perturbation: FlatPerturbation | None = None,
        capture: Iterable[int] = (),
    ) -> SolveResult:
        """Run this solver on flat states ``[B, D]`` in the current grad mode (see :func:`~.loop.iterate`)."""
        result = iterate(self, f, z0, perturbation=perturbation, capture=capture)
        apply_failure_policy(self.on_failure, result.stats)
        return result

    def __repr__(self) -> str:
        return settings_repr(self)
