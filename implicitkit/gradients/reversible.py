"""Reversible DEQ: an algebraically invertible iteration, differentiated by running it backwards."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._settings import as_count
from .._tree import State, StateSpec, flatten, unflatten
from ..closure_inputs import ClosureInputs
from ..solvers import FixedPointIteration, Solver, SolveResult, iterate
from ..solvers.loop import FlatMap, FlatPerturbation, check_capture
from .base import AuxMap, GradientEstimator, Map, Recorder
from .tangent import carries_tangent, under_reverse_transform

_HIGHER_ORDER = (
    "Reversible does not differentiate its own backward pass, so a second derivative (create_graph=True) "
    "through it is refused. Use gradient=Unrolled() with FixedPointIteration, whose graph is ordinary autograd."
)


class Reversible(GradientEstimator):
    """Exact gradients of a reversible fixed-point iteration, with memory constant in its number of steps.

    The forward solve iterates a pair of states from ``y_0 = z_0``::

        y_{n+1} = (1 - beta) y_n + beta f(z_n)
        z_{n+1} = (1 - beta) z_n + beta f(y_{n+1})

    whose common fixed point is ``y = z = z*``, and returns ``z``. Each step can be undone exactly,
    ``z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)`` then ``y_n = (y_{n+1} - beta f(z_n)) / (1 - beta)``,
    so the backward pass rebuilds every iterate from the last pair instead of storing it, applying the VJPs
    of ``f`` as it goes: the gradient is that of the steps actually taken (the same as :class:`Unrolled`
    through this iteration), at two applications of f forward and two with a VJP backward per step, with the
    graph of one application of ``f`` alive at a time. Gradients reach ``z0`` too.

    The solver only gives the budget: pass ``FixedPointIteration(tol=..., max_iter=...)`` (plain, no damping:
    ``beta`` is this iteration's relaxation). One step of the solve is one step of the pair (two applications
    of f); every sample stops on its own; ``stats.residual`` is the size of a pair step,
    ``||(y_{n+1}, z_{n+1}) - (y_n, z_n)||`` (divided by ``||(y_{n+1}, z_{n+1})||`` under ``"rel"``), which near
    the fixed point is ``beta sqrt(2) ||f(z) - z||`` (``"abs"``) or ``beta ||f(z) - z|| / ||f(z)||`` (``"rel"``).

    Undoing a step divides by ``1 - beta``: a step shrinks the pair's volume by ``(1 - beta)^2`` per
    coordinate, so in floating point it loses about ``2 log2(1 / |1 - beta|)`` bits of the earlier iterates
    (4.6 bits at ``beta = 0.8``), and the rebuilt path drifts from the forward one exponentially in the number
    of steps undone: the gradient is exact to rounding for a few steps (in float64 about 5 at ``beta = 0.8``
    and 10 at ``beta = 0.5``; in float32 about 5 at ``beta = 0.5`` and none at 0.8), then degrades. ``checkpoint_every=k`` stores the pair
    every ``k`` steps (states only, no activations) and restarts the rebuilding from each, which bounds the
    drift by that of ``k`` steps at the price of memory growing as ``steps / k``. Each backward pass records
    a :class:`ReversibleStats` in ``Solution.backward_stats``, with the drift measured against every known
    state; ``docs/gradients.md`` has measured errors. ``f`` must be deterministic (hold dropout masks fixed
    within a solve) and may not take a perturbation.

    Arguments:
        beta: the relaxation, in ``(0, 2)`` and not 1 (where a step cannot be undone).
        checkpoint_every: store the pair after every this many steps; ``None`` (the paper's scheme) stores
            nothing, so memory does not grow with the steps.

    Reference: McCallum, Arora & Foster, "Reversible deep equilibrium models", 2025 (arXiv 2509.12917).
    """

    def __init__(self, beta: float = 0.8, *, checkpoint_every: int | None = None) -> None:
        if not 0.0 < beta < 2.0 or beta == 1.0:
            raise ValueError(
                f"beta must lie in (0, 2) and not be 1 (a step with beta = 1 cannot be undone), got {beta}."
            )
        if checkpoint_every is not None:
            checkpoint_every = as_count("checkpoint_every", checkpoint_every)
            if checkpoint_every < 1:
                raise ValueError(
                    f"checkpoint_every must be a positive step count or None, got {checkpoint_every}."
                )
        self.beta = float(beta)
        self.checkpoint_every = checkpoint_every

    def __repr__(self) -> str:
        every = "" if self.checkpoint_every is None else f", checkpoint_every={self.checkpoint_every}"
        return f"Reversible(beta={self.beta:g}{every})"

    def solve(
        self,
        solver: Solver,
        f: FlatMap,
        z0: Tensor,
        *,
        perturbation: FlatPerturbation | None = None,
        capture: Iterable[int] = (),
    ) -> SolveResult:
        """Iterate the pair from ``(z0, z0)`` under ``solver``'s budget and stop rule, without autograd."""
        self._check(solver, perturbation)
        beta, dim = self.beta, z0.shape[1]

        def step(pair: Tensor) -> Tensor:
            y, z = pair[:, :dim], pair[:, dim:]
            y = torch.lerp(y, f(z), beta)
            return torch.cat([y, torch.lerp(z, f(y), beta)], dim=1)

        capture = set(check_capture(capture, solver.max_iter))
        every = self.checkpoint_every
        checkpoints = set(range(every, solver.max_iter, every)) if every else set()
        with torch.no_grad():
            start = z0.detach()
            pair0 = torch.cat([start, start], dim=1)
            run = iterate(solver, step, pair0, capture=capture | checkpoints)
        stats = dataclasses.replace(run.stats, solver=repr(self))  # fixed_point applies the failure policy
        best = _best_steps(stats)
        ends = {k: _End(run.captured[k], torch.where(stats.nstep >= k, k, best), dim) for k in capture}
        value = _End(run.value, best, dim)
        return _ReversibleResult(
            value=value.z,
            last=run.last[:, dim:],
            stats=stats,
            captured={k: end.z for k, end in ends.items()},
            ends={None: value, **ends},
            checkpoints={k: (run.captured[k][:, :dim], run.captured[k][:, dim:]) for k in checkpoints},
            z0=z0,
        )

    def attach_result(
        self, f: Map, result: SolveResult, step: int | None, spec: StateSpec, record: Recorder | None = None
    ) -> State:
        if not isinstance(result, _ReversibleResult):
            raise TypeError("Reversible can only differentiate a solve that it ran itself (its own solve()).")
        end = result.ends[step]
        if carries_tangent(f, unflatten(end.z, spec)):
            raise RuntimeError(
                "Reversible does not support forward-mode differentiation (torch.func.jvp, jacfwd, "
                "torch.autograd.forward_ad): its gradient is a reversed sweep, which has no forward-mode "
                "twin here. Use gradient=IFT() (or Unrolled()) for forward mode."
            )
        if not torch.is_grad_enabled():
            return unflatten(end.z, spec)
        if under_reverse_transform():
            raise RuntimeError(
                "Reversible cannot run under torch.func.grad, vjp or jacrev: its backward rebuilds the path "
                "with torch.autograd inside the transform, which functorch does not allow. Take the gradient "
                "with loss.backward() or torch.autograd.grad, or use JFB, Phantom, RAG or Unrolled, whose "
                "graphs are plain autograd."
            )

        def f_flat(z: Tensor) -> Tensor:
            return flatten(f(unflatten(z, spec)), spec)

        closure = ClosureInputs(f_flat, end.z)
        if not closure.tensors and not result.z0.requires_grad:
            return unflatten(end.z, spec)  # nothing could receive a gradient
        sweep = _Sweep(
            f_flat, closure, self.beta, end, result.checkpoints, result.z0.detach(), record, repr(self)
        )
        return unflatten(_Reverse.apply(sweep, result.z0, *closure.tensors), spec)

    def attach_result_with_aux(
        self, f: AuxMap, result: SolveResult, spec: StateSpec, record: Recorder | None = None
    ) -> tuple[State, Any]:
        """The value through the reversed iteration, and the aux of one more evaluation of ``f`` at it."""
        value = self.attach_result(lambda z: f(z)[0], result, None, spec, record)
        return value, f(value)[1]

    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        raise TypeError(
            "Reversible needs the pair of states its own solve left, not a state alone: use it through "
            "fixed_point(..., gradient=Reversible()) or DEQ(..., gradient=Reversible())."
        )

    @staticmethod
    def _check(solver: Solver, perturbation: FlatPerturbation | None) -> None:
        if not isinstance(solver, FixedPointIteration) or solver.damping != 1.0:
            raise TypeError(
                f"Reversible runs its own coupled iteration and takes only the budget and stop rule from the "
                f"solver, so it needs solver=FixedPointIteration(tol=..., max_iter=...) without damping (beta "
                f"is the relaxation), got {solver!r}."
            )
        if perturbation is not None:
            raise ValueError(
                "Reversible rebuilds the forward path by undoing each step, which a random perturbation of the "
                "path would make impossible: drop the perturbation, or use another estimator with it."
            )


@dataclass
class ReversibleStats:
    """What one reversible backward pass did, per sample (``[B]`` tensors).

    Attributes:
        nstep: the steps undone (those taken up to the differentiated state).
        reconstruction_error: the largest absolute difference between a rebuilt state (either of the pair)
            and the known one: ``z0`` at the start, and each stored pair under ``checkpoint_every``. It
            measures the drift of the rebuilt path, 0 in exact arithmetic.
        estimator: the estimator's name, for messages.
    """

    nstep: Tensor
    reconstruction_error: Tensor
    estimator: str = "Reversible"

    def summary(self) -> str:
        if self.nstep.numel() == 0:
            return f"{self.estimator} backward: empty batch"
        return (
            f"{self.estimator} backward: steps max {int(self.nstep.max())}, reconstruction error max "
            f"{float(self.reconstruction_error.max()):.2e}"
        )

    def __repr__(self) -> str:
        return f"ReversibleStats({self.summary()})"


class _End:
    """The pair after some step, as flat ``y`` and ``z`` (``[B, D]`` each), and the steps that led to it."""

    __slots__ = ("steps", "y", "z")

    def __init__(self, pair: Tensor, steps: Tensor, dim: int) -> None:
        self.y, self.z, self.steps = pair[:, :dim], pair[:, dim:], steps


@dataclass
class _ReversibleResult(SolveResult):
    """A solve's result with the pair and step count of each differentiable output (key: step, or None)."""

    ends: dict[int | None, _End] = dataclasses.field(default_factory=dict)
    checkpoints: dict[int, tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)
    z0: Tensor | None = None


def _best_steps(stats) -> Tensor:
    """``[B]``: the step of each sample's returned (lowest-residual) pair, 0 when none improved on ``z0``.

    The loop's trace holds each step's residual and repeats the best one after a sample stops, so the best
    step is the first at which the trace equals the reported residual.
    """
    hit = stats.trace == stats.residual.unsqueeze(0)
    return torch.where(hit.any(dim=0), hit.int().argmax(dim=0) + 1, 0)


class _Sweep:
    """The backward pass: undo the steps from the last pair while pulling the cotangents back through them."""

    def __init__(
        self,
        f: FlatMap,
        closure: ClosureInputs,
        beta: float,
        end: _End,
        checkpoints: dict[int, tuple[Tensor, Tensor]],
        z0: Tensor,
        record: Recorder | None,
        name: str,
    ) -> None:
        self.f, self.closure, self.beta, self.end = f, closure, beta, end
        self.known = {**checkpoints, 0: (z0, z0)}  # states the rebuilt path can be checked against
        self.record, self.name = record, name

    def run(self, grad_z: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """``(dL/dz0, dL/d closure tensors)`` from ``dL/dz`` at the end pair (``dL/dy`` is 0 there)."""
        beta, keep = self.beta, 1.0 - self.beta
        y, z, steps = self.end.y, self.end.z, self.end.steps
        a_z, a_y = grad_z.to(z.dtype), torch.zeros_like(z)
        grads: list[Tensor | None] = [None] * len(self.closure.tensors)
        error = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        for n in range(int(steps.max()) if steps.numel() else 0, 0, -1):
            moving = (steps >= n).unsqueeze(1)  # the samples whose step n is undone here
            # z_n = keep z_{n-1} + beta f(y_n): undo it, and pull a_z back to y_n and z_{n-1}.
            fy, j_y = self._vjp(y, torch.where(moving, beta * a_z, 0.0), grads)
            z = torch.where(moving, (z - beta * fy) / keep, z)
            a_y = a_y + j_y
            a_z = torch.where(moving, keep * a_z, a_z)
            # y_n = keep y_{n-1} + beta f(z_{n-1}): undo it, and pull a_y back to y_{n-1} and z_{n-1}.
            fz, j_z = self._vjp(z, torch.where(moving, beta * a_y, 0.0), grads)
            y = torch.where(moving, (y - beta * fz) / keep, y)
            a_z = a_z + j_z
            a_y = torch.where(moving, keep * a_y, a_y)
            if n - 1 in self.known:  # a stored pair: measure the drift, and restart from the exact states
                y_known, z_known = self.known[n - 1]
                drift = torch.maximum((y - y_known).abs().amax(dim=1), (z - z_known).abs().amax(dim=1))
                error = torch.where(moving.squeeze(1), torch.maximum(error, drift), error)
                y, z = torch.where(moving, y_known, y), torch.where(moving, z_known, z)
        self._report(steps, error)
        return a_z + a_y, grads  # y_0 = z_0 = z0

    def _vjp(self, point: Tensor, v: Tensor, grads: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        """``f(point)`` (detached) and ``v df/dz`` there; adds ``v df/d(closure)`` into ``grads``."""
        out, j, products = self.closure.vjp(self.f, point, v)
        for i, part in enumerate(products):
            if part is not None:
                grads[i] = part if grads[i] is None else grads[i] + part
        return out, j

    def _report(self, steps: Tensor, error: Tensor) -> None:
        stats = ReversibleStats(steps.clone(), error, self.name)
        if self.record is not None:
            self.record(stats)
        bad = ~torch.isfinite(error)
        if bool(bad.any()):
            warnings.warn(
                f"{self.name}: rebuilding the forward path overflowed for {int(bad.sum())}/{bad.numel()} samples "
                "(each undone step divides by 1 - beta), so their gradients are not finite. Pass "
                "Reversible(checkpoint_every=k) to restart from a stored pair every k steps, take fewer "
                "steps, or solve in float64.",
                RuntimeWarning,
                stacklevel=3,
            )


class _Reverse(torch.autograd.Function):
    """Returns the end state; its backward is the reversible sweep, with gradients for z0 and the closure."""

    @staticmethod
    def forward(ctx, sweep: _Sweep, z0: Tensor, *closure: Tensor) -> Tensor:
        ctx.sweep = sweep
        return sweep.end.z.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(_HIGHER_ORDER)
        sweep: _Sweep = ctx.sweep
        g_z0, g_closure = sweep.run(grad)
        closure = sweep.closure.tensors
        return (
            None,
            g_z0 if ctx.needs_input_grad[1] else None,
            *(None if g is None else g.to(t.dtype) for g, t in zip(g_closure, closure, strict=True)),
        )
