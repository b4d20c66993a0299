"""Layers whose state is drawn once per solve: the protocol, and how a solve starts and binds that state.

A dropout mask or a normalised weight must stay fixed while a solver iterates a cell, or the map changes
from one step to the next and has no fixed point. Such a layer keeps the state of the current solve in
``solve_state`` and makes a fresh one when asked. :func:`new_solve` asks every such layer of a module; the
:class:`SolveScope` it returns puts that solve's states back around any later call of the cell that belongs
to the same solve (a gradient estimator's grad-attached applications, a path branch built after another
solve, a checkpointed segment replayed in backward).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..gradients.tangent import forward_mode_active


@runtime_checkable
class PerSolve(Protocol):
    """A module whose forward uses a state that is fixed within one solve (a mask, a normalised weight).

    The layer reads ``self.solve_state`` in its forward (``None`` before the first solve) and implements
    :meth:`new_solve_state`; :func:`new_solve` sets ``solve_state`` from it, and :class:`SolveScope` swaps
    it. The state may be a mutable holder that the layer fills on its first call of the solve (a mask needs
    the input's shape).
    """

    solve_state: Any

    def new_solve_state(self) -> Any:
        """The state for a new solve; called once at its start, in the caller's grad mode."""


class PerSolveModule(nn.Module):
    """An ``nn.Module`` that keeps a per-solve state in ``solve_state``; a copy of it starts outside any solve.

    A copy (``copy.deepcopy`` for an EMA or best-model snapshot, pickling) that kept the last solve's state
    would reuse its mask, or hold a cached weight from that solve's graph, which deepcopy refuses.
    """

    solve_state: Any

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "solve_state": None}


class SolveScope:
    """The per-solve states of one solve; a context manager that makes them current, and :meth:`bind`.

    Entering puts this solve's states into their layers and leaving restores what was there, so calls that
    belong to this solve see its mask and weights even after later solves of the same module.
    """

    def __init__(self, states: dict[PerSolve, Any]) -> None:
        self.states = states
        self._saved: list[list[Any]] = []

    def __enter__(self) -> SolveScope:
        self._saved.append([layer.solve_state for layer in self.states])
        for layer, state in self.states.items():
            layer.solve_state = state
        _active_scopes().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active_scopes().pop()
        for layer, state in zip(self.states, self._saved.pop()):
            layer.solve_state = state

    def bind(self, f: Callable) -> Callable:
        """``f`` run with this solve's states; ``f`` itself when the module has no per-solve layer."""
        if not self.states:
            return f

        def bound(*args, **kwargs):
            with self:
                return f(*args, **kwargs)

        return bound


def new_solve(module: nn.Module) -> SolveScope:
    """Start a new solve for every :class:`PerSolve` layer in ``module``: a new mask, a new normalised weight.

    :class:`~implicitkit.DEQ` calls it at the start of each forward and binds the cell to the returned
    scope. With :func:`~implicitkit.fixed_point`, call it before each solve; binding the map
    (``scope.bind(f)``) keeps the solve's states for calls made after a later solve of the same module.

    A layer that belongs to a solve in progress (a DEQ inside another DEQ's cell, whose solve drew the
    inner layers' states too) keeps that solve's state: the outer map stays the same from step to step.

    Arguments:
        module: the cell (any ``nn.Module``); its submodules are searched.

    Returns:
        A :class:`SolveScope` holding the new states, already made current.
    """
    running = {layer for scope in _active_scopes() for layer in scope.states}
    states = {}
    for layer in module.modules():
        if _is_per_solve(layer):
            if layer in running:
                states[layer] = layer.solve_state
            else:
                layer.solve_state = states[layer] = layer.new_solve_state()
    return SolveScope(states)


_LOCAL = threading.local()


def _active_scopes() -> list[SolveScope]:
    """The scopes entered on this thread, innermost last: the solves in progress."""
    if not hasattr(_LOCAL, "scopes"):
        _LOCAL.scopes = []
    return _LOCAL.scopes


def _is_per_solve(layer: nn.Module) -> bool:
    """``isinstance(layer, PerSolve)`` by its two attributes: the protocol's own check is an ``ABCMeta``
    call that ``torch.compile`` cannot trace (a graph break per module searched)."""
    return hasattr(layer, "solve_state") and callable(getattr(layer, "new_solve_state", None))


class _Cache:
    """A value computed at most once per solve, in the grad mode of the solve's start."""

    def __init__(self, grad_enabled: bool) -> None:
        self.grad_enabled = grad_enabled
        self.value: Tensor | None = None
        self.versions: tuple[int, ...] = ()


class OncePerSolve(PerSolveModule):
    """A parametrization (``torch.nn.utils.parametrize``) whose value is computed once per solve.

    Within a solve, the first access computes :meth:`compute` in the grad mode the solve started in (so a
    first access inside the solver's no-grad loop still has the graph the estimator needs) and every later
    access returns that tensor. Outside any solve, after an in-place change of the raw tensors (an
    optimiser step), with grad after a solve that started without, and wherever forward-mode AD computes
    tangents, it is computed afresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self.solve_state: _Cache | None = None

    def new_solve_state(self) -> _Cache:
        return _Cache(torch.is_grad_enabled())

    def compute(self, *originals: Tensor) -> Tensor:
        """The parametrized tensor from the raw ones (once per solve, and at every access outside a solve)."""
        raise NotImplementedError

    def recompute(self, *originals: Tensor) -> Tensor:
        """The solve's tensor again, for a caller that needs what the cached one lacks; :meth:`compute` unless
        computing changes state (spectral norm's power iteration, which takes its steps once per solve)."""
        return self.compute(*originals)

    def forward(self, *originals: Tensor) -> Tensor:
        cache = self.solve_state
        if cache is None:
            return self.compute(*originals)
        # Afresh where the cached weight would lack what the caller needs: a graph (a call with grad after a
        # no-grad solve, such as a manual JFB step) or a tangent (cached in the solve's primal-only loop).
        if (torch.is_grad_enabled() and not cache.grad_enabled) or (
            forward_mode_active() and torch._C._is_fwd_grad_enabled()
        ):
            return self.recompute(*originals)
        versions = tuple(t._version for t in originals)
        if cache.value is None or cache.versions != versions:
            with torch.set_grad_enabled(cache.grad_enabled):
                cache.value = self.compute(*originals)
            cache.versions = versions
        return cache.value
