"""The one loop every solver runs in: per-sample stopping, best and last iterate, failure codes.

What the loop keeps per step (residuals, which samples were active) goes into buffers written in place
(allocated once for ``max_iter`` steps with ``tol=None``; for an adaptive solve 64 rows at first, doubled as
needed): small tensors kept alive between large per-step temporaries fragment the CPU heap, and
then a process's memory grows with the step count even though nothing large is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._compile import not_compiled
from .._settings import as_count
from ..stats import Result, SolverStats

FlatMap = Callable[[Tensor], Tensor]
FlatPerturbation = Callable[[Tensor, int], Tensor]


class LoopSolver(Protocol):
    """What the loop asks of a solver: its settings and its step (:class:`~.base.Solver` provides them)."""

    tol: float | None
    max_iter: int
    stop_mode: str
    divergence_factor: float

    def init(self, z0: Tensor) -> Any: ...

    def step(self, memory: Any, z: Tensor, fz: Tensor) -> Tensor: ...

    def continues(self, residual: Tensor, abs_residual: Tensor, out: Tensor | None = None) -> Tensor: ...


# Keeps the relative residual finite at a fixed point of (near) zero norm.
_REL_EPS = 1e-8
# A sample whose state grew this many times its starting size while its absolute residual stayed above this
# fraction of its first value made no progress towards a fixed point: only the relative residual shrank, by
# the growth of its denominator (a map with no fixed point, iterated off to infinity). The fraction: a
# contraction at rate q has r = (1 - q) ||z - z*||, so a residual that fell from r_0 to r_k over a travel D
# puts z* about r_k D / (r_0 - r_k) further on; r_k > r_0 / (1 + 1/10) places it more than 10 times further
# than the state has come, already 100-fold. A slow contraction (0.999 z + x, z* at 1000 times its start)
# has fallen below that fraction by the time it has grown 100-fold, and is not called diverged.
_NO_PROGRESS_GROWTH = 100.0
_NO_PROGRESS_RESIDUAL = 1 / (1 + 1 / 10)


@dataclass
class SolveResult:
    """Flat output of :func:`iterate`, all ``[B, D]``: the best and the last iterate, stats, captured states."""

    value: Tensor
    last: Tensor
    stats: SolverStats
    captured: dict[int, Tensor]


@not_compiled  # a data-dependent loop: one graph break for direct callers (see functional.py)
def iterate(
    solver: LoopSolver,
    f: FlatMap,
    z0: Tensor,
    *,
    perturbation: FlatPerturbation | None = None,
    capture: Iterable[int] = (),
    checkpoint_every: int | None = None,
) -> SolveResult:
    """Iterate ``f`` from ``z0`` (``[B, D]``) with ``solver``'s steps until every sample stops.

    Runs in the current grad mode: under ``torch.no_grad()`` nothing of the path is kept; with autograd on
    (unrolled differentiation) every step is part of the graph. Residuals are always computed without a graph.
    Failed samples are only reported in the stats: the caller applies a failure policy (``fixed_point`` and
    :meth:`~.base.Solver.solve` the solver's, IFT its own to its adjoint solve).

    Arguments:
        solver: proposes the next iterate and holds the stop rule.
        f: the map on flat states, ``[B, D] -> [B, D]``.
        z0: the starting point.
        perturbation: ``(z, step) -> z`` applied before the map at each step (steps count from 1); samples
            that already stopped are not perturbed.
        capture: steps after which to keep the state (``f(z)`` of that step); a sample already stopped
            contributes its returned value.
        checkpoint_every: with autograd on, keep only the loop's state every this many steps and recompute
            the steps between in the backward pass (see :func:`_run_checkpointed`); ``None`` keeps them all.

    Returns:
        A :class:`SolveResult`.
    """
    capture = check_capture(capture, solver.max_iter)
    fixed_count = solver.tol is None
    # A host read per step costs nothing on the CPU, which computes synchronously anyway, and it lets plain
    # norms be checked for overflow. On an accelerator a fixed count reads nothing back (the device stays
    # busy, and the loop can be captured in a CUDA graph); its norms are then computed scaled, safe as they are.
    reads_host = not fixed_count or z0.device.type == "cpu"
    rule = None if fixed_count else solver  # who decides which samples go on
    batch, steps = z0.shape[0], solver.max_iter
    history = _Record(steps, batch, z0, solver.stop_mode, solver.divergence_factor, grow=not fixed_count)
    autocast_on = torch.is_autocast_enabled(z0.device.type)
    # ``limits`` are set at step 1 from each sample's first residual and size; before it the best residual
    # is inf. ``all_active`` is known from the last host sync: a full batch skips its masking ops.
    start_carry = _Carry(
        z=z0, last=z0, best_value=z0, best_res=history.best[0], limits=None,
        active=history.active_rows[0], all_active=True, memory=solver.init(z0),
    )  # fmt: skip

    loop = _Loop(solver, f, perturbation, capture, history, rule, reads_host, autocast_on)
    if checkpoint_every is None or not torch.is_grad_enabled():
        carry, captured = loop.run(start_carry, 1, steps)
    else:
        carry, captured = _run_checkpointed(loop.run, start_carry, steps, checkpoint_every)
    taken, best_value, best_res, limits, last = (
        carry.taken, carry.best_value, carry.best_res, carry.limits, carry.last
    )  # fmt: skip

    for k in capture:  # every sample stopped before these steps: their state is the returned value
        captured.setdefault(k, best_value)
    # The autocast precision is kept for the advice when a sample fails: its rounding can keep a tight tol
    # out of reach.
    autocast_dtype = torch.get_autocast_dtype(z0.device.type) if autocast_on else None
    stats = history.stats(solver, taken, best_res, limits, last, autocast_dtype)
    return SolveResult(best_value, last, stats, captured)


@dataclass
class _Loop:
    """The steps of one solve: what :func:`iterate` set up, and the loop body that segments replay."""

    solver: LoopSolver
    f: FlatMap
    perturbation: FlatPerturbation | None
    capture: list[int]
    history: _Record
    rule: LoopSolver | None  # who decides which samples go on (None: a fixed count)
    reads_host: bool
    autocast_on: bool

    def run(self, carry: _Carry, start: int, stop: int) -> tuple[_Carry, dict[int, Tensor]]:
        """Steps ``start..stop`` from ``carry``, which is left as it was (a checkpoint replays from it)."""
        z, last, best_value, best_res = carry.z, carry.last, carry.best_value, carry.best_res
        limits, active, all_active, taken = carry.limits, carry.active, carry.all_active, carry.taken
        memory = copy.copy(carry.memory)  # solvers update their memory's fields in place
        captured: dict[int, Tensor] = {}
        done = False
        for k in range(start, stop + 1):
            taken = k
            self.history.reserve(k)
            act = self.history.active_rows[k - 1]  # the samples this step moves
            if torch.is_grad_enabled():  # unrolled: a mask saved for backward must not see later writes
                act = act.clone()
            moving = None if all_active else act
            if self.perturbation is not None:
                z = _masked(moving, self.perturbation(z, k), z)
            fz = self.f(z)
            verdict = self.history.judge(
                k, z, fz, self.rule, limits, best_res, act, active, all_active, self.reads_host
            )
            limits, active, n_active, n_improved, improved, best_res = verdict
            # Unrolled: the mask saved for backward must not see the next step's write.
            all_improved = n_improved == z.shape[0]
            better = None if all_improved else (improved.clone() if torch.is_grad_enabled() else improved)
            best_value = _masked(better, fz, best_value)
            last = _masked(moving, fz, last)
            if k in self.capture:
                captured[k] = _masked(moving, fz, best_value)
            if n_active == 0 or k == self.solver.max_iter:
                done = True
                break
            proposal = self.propose(memory, z, fz)
            all_active = n_active == z.shape[0]
            z = _masked(None if all_active else active.clone(), proposal, z)
        end = _Carry(z, last, best_value, best_res, limits, active, all_active, memory, taken, done)
        return end, captured

    def propose(self, memory: Any, z: Tensor, fz: Tensor) -> Tensor:
        """The solver's next iterate. Autocast would run the history's matmuls and least-squares solves in
        bf16/fp16; the state is kept in >= float32 (see _tree.solver_dtype) and so is everything the solver
        does with it."""
        if not self.autocast_on:
            return self.solver.step(memory, z, fz)
        with torch.autocast(z.device.type, enabled=False):
            return self.solver.step(memory, z, fz)


def _masked(rows: Tensor | None, new: Tensor, old: Tensor) -> Tensor:
    """``new`` on the samples `rows` marks and ``old`` on the others; ``new`` itself when `rows` is None (all)."""
    return new if rows is None else torch.where(rows[:, None], new, old)


@dataclass
class _Carry:
    """What one step hands to the next, besides the history buffers (written once per step, in place)."""

    z: Tensor
    last: Tensor
    best_value: Tensor
    best_res: Tensor
    limits: Any  # _Limits once step 1 ran, else None
    active: Tensor
    all_active: bool
    memory: Any
    taken: int = 0
    done: bool = False


Run = Callable[[_Carry, int, int], "tuple[_Carry, dict[int, Tensor]]"]


def _run_checkpointed(run: Run, carry: _Carry, steps: int, every: int) -> tuple[_Carry, dict[int, Tensor]]:
    """Run the loop in segments of ``every`` steps, each one an activation checkpoint.

    A segment keeps only the state it started from; backward replays it with autograd (the same operations
    on the same values, so the gradient is exactly the plain unrolled one) and frees it before the one
    before it. Autograd memory thus holds ``steps / every`` loop states plus one segment's graphs. The
    replay is compared with the forward pass, so a map or solver that does not repeat itself raises
    instead of giving a wrong gradient.
    """
    captured: dict[int, Tensor] = {}
    for start in range(1, steps + 1, every):
        stop = min(start + every - 1, steps)
        # The best residual lives in buffers the later steps overwrite: the replay needs its own copy.
        carry = dataclasses.replace(carry, best_res=carry.best_res.clone())
        segment = _Segment(run, start, stop)
        # z is passed on its own so that checkpoint sees the device whose random state it must restore.
        carry, found = checkpoint(segment, carry.z, carry, use_reentrant=False, early_stop=False)
        segment.forward_end = carry.z.detach()  # detached: no reference cycle through the graph
        captured.update(found)
        if carry.done:
            break
    return carry, captured


class _Segment:
    """Steps ``start..stop`` of the loop as a function of their starting state, for :func:`checkpoint`."""

    def __init__(self, run: Run, start: int, stop: int) -> None:
        self.run, self.start, self.stop = run, start, stop
        self.forward_end: Tensor | None = None

    def __call__(self, z: Tensor, carry: _Carry) -> tuple[_Carry, dict[int, Tensor]]:
        end, captured = self.run(dataclasses.replace(carry, z=z), self.start, self.stop)
        if self.forward_end is not None:  # the backward pass's replay
            same = torch.allclose(
                end.z.detach(), self.forward_end.detach(), rtol=1e-4, atol=1e-6, equal_nan=True
            )
            if not same:
                raise RuntimeError(
                    f"Replaying solver steps {self.start}-{self.stop} for the backward pass of "
                    "Unrolled(checkpoint_every=...) gave a different state than the forward pass, so its "
                    "gradient would be wrong. The map, the perturbation or the solver does not repeat itself: "
                    "draw random numbers from torch's global generator (checkpointing restores it, not a "
                    "torch.Generator of your own), update solver memory out of place, or pass "
                    "checkpoint_every=None."
                )
        return end, captured


@dataclass
class _Limits:
    """Per-sample bounds set at step 1, past which a sample is stopped as diverged.

    ``residual``: ``divergence_factor`` times the first absolute residual (the map pushes the state away);
    ``size``: ``divergence_factor`` times the larger of ``||z_0||`` and ``||f(z_0)||`` (the state runs off,
    even where the residual stays flat, as for ``z + 1``). ``first_residual`` and ``first_size`` are kept for
    the no-progress test of :meth:`_Record.stats`.
    """

    residual: Tensor
    size: Tensor
    first_residual: Tensor
    first_size: Tensor

    @classmethod
    def at_first_step(cls, factor: float, abs_res: Tensor, z: Tensor, fz_norm: Tensor) -> _Limits:
        first_size = torch.maximum(_scaled_norm(z.detach(), inplace=False), fz_norm)
        first_residual = abs_res.clone()
        return cls(factor * first_residual, factor * first_size, first_residual, first_size)

    def no_progress(self, size: Tensor, abs_res: Tensor) -> Tensor:
        """``[B]``: the state grew ``_NO_PROGRESS_GROWTH`` times its starting size while its absolute residual
        stayed above ``_NO_PROGRESS_RESIDUAL`` times its first one: it ran off instead of approaching a fixed
        point (in ``"rel"`` mode its residual may still have met ``tol``, by the growth of the denominator).
        """
        grew = size > _NO_PROGRESS_GROWTH * self.first_size
        return grew & (abs_res > _NO_PROGRESS_RESIDUAL * self.first_residual)


_FIRST_ROWS = 64  # steps an adaptive solve keeps room for at first; doubled as needed


class _Record:
    """Everything the loop keeps between steps, in buffers written in place (an adaptive solve's rows doubled
    as needed).

    ``active[k - 1]`` marks the samples that step ``k`` moves; ``abs`` and ``res`` hold each step's absolute
    and stop-mode residuals (one buffer in ``"abs"`` mode) and ``size`` each step's ``||f(z)||``; ``best`` is a
    pair of buffers that the best residual alternates between when only some samples improved.
    """

    def __init__(
        self,
        steps: int,
        batch: int,
        like: Tensor,
        stop_mode: str,
        divergence_factor: float,
        *,
        grow: bool = True,
    ) -> None:
        self._new = functools.partial(torch.empty, device=like.device, dtype=like.dtype)
        self.steps, self.stop_mode, self.divergence_factor = steps, stop_mode, divergence_factor
        self._batch, self._device, self._rows = batch, like.device, 0
        # An adaptive solve grows its rows as it goes, so that a generous max_iter costs nothing until used; a
        # fixed count takes them all at once (no allocation inside the loop, which a CUDA graph can capture).
        self._grow(min(steps, _FIRST_ROWS) if grow else steps)
        self.best = self._new(2, batch).fill_(torch.inf).unbind(0)
        # Scratch for every per-step temporary: small tensors that outlive a step between the map's large
        # temporaries are what fragments the heap. f(z) - z is reused too: one large allocation less.
        self._diff = torch.empty_like(like)
        self._denominator = self._new(batch)
        self.improved, self._above, self._within = (like.new_empty(batch, dtype=torch.bool) for _ in range(3))
        self._counts = self._new(4)
        self._count_slots = self._counts.unbind(0)

    def reserve(self, k: int) -> None:
        """Make room for step ``k`` (doubling the rows, those written kept)."""
        if k > self._rows:
            self._grow(min(self.steps, 2 * self._rows))

    def _grow(self, rows: int) -> None:
        """Room for ``rows`` steps, the rows written so far copied into the new buffers."""
        self._rows = rows

        def grown(name: str, fresh: Tensor) -> Tensor:
            old = getattr(self, name, None)
            if old is not None:
                fresh[: len(old)].copy_(old)
            return fresh

        shape = (rows, self._batch)
        self.abs = grown("abs", self._new(shape))
        self.res = self.abs if self.stop_mode == "abs" else grown("res", self._new(shape))
        self.size = grown("size", self._new(shape))
        # Every sample moves until a stop rule says otherwise; a spare last row.
        self.active = grown(
            "active", torch.ones(rows + 1, self._batch, device=self._device, dtype=torch.bool)
        )
        # Row views made once per size: indexing a tuple costs nothing, indexing a tensor is an operation.
        self.abs_rows, self.res_rows, self.size_rows = (
            self.abs.unbind(0),
            self.res.unbind(0),
            self.size.unbind(0),
        )
        self.active_rows = self.active.unbind(0)

    def residuals(self, k: int, z: Tensor, fz: Tensor, *, safe: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Write step ``k``'s ``||f(z) - z||``, stop-mode residual and ``||f(z)||`` into their rows; return them.

        ``safe`` computes norms that cannot overflow.
        """
        abs_row, res_row, size_row = self.abs_rows[k - 1], self.res_rows[k - 1], self.size_rows[k - 1]
        z, fz = z.detach(), fz.detach()  # out= ops: an unrolled solve in forward mode has tangents here
        diff = torch.sub(fz, z, out=self._diff)
        if safe:
            abs_row.copy_(_scaled_norm(diff, inplace=True))
            size_row.copy_(_scaled_norm(fz, inplace=False))
        else:
            torch.linalg.vector_norm(diff, dim=1, out=abs_row)
            torch.linalg.vector_norm(fz, dim=1, out=size_row)
        if self.stop_mode == "rel":
            torch.div(abs_row, torch.add(size_row, _REL_EPS, out=self._denominator), out=res_row)
        return abs_row, res_row, size_row

    @torch.no_grad()
    def judge(
        self,
        k: int,
        z: Tensor,
        fz: Tensor,
        rule: LoopSolver | None,
        limits: _Limits | None,
        best_res: Tensor,
        act: Tensor,
        active: Tensor,
        all_active: bool,
        reads_host: bool,
    ) -> tuple[_Limits, Tensor, int, int, Tensor, Tensor]:
        """Step ``k``'s residuals, stop rule and best residual, without a graph.

        Sets the divergence ``limits`` at step 1. Without host reads (a fixed count on an accelerator) every
        sample goes on and nothing is read back (``n_improved`` is then -1: unknown). A non-finite norm that
        comes from overflow, not from NaN or inf in the state, is computed again, scaled.

        Returns:
            ``(limits, active, n_active, n_improved, improved, best_res)``.
        """
        abs_res, res, fz_norm = self.residuals(k, z, fz, safe=not reads_host)
        if k == 1:
            limits = _Limits.at_first_step(self.divergence_factor, abs_res, z, fz_norm)
        # A tie counts: of equal residuals the later iterate is kept (a sample that starts at its fixed
        # point keeps every step's graph under Unrolled, not the first's). NaN is false: never an improvement.
        improved = torch.le(res, best_res, out=self.improved)
        batch = res.shape[0]
        if not reads_host:
            n_active, n_improved = batch, -1  # no stopping, no host sync
        else:
            active, n_active, n_improved, probe = self.stop(rule, k, limits, improved, all_active)
            if not math.isfinite(probe) and _overflowed(act, res, fz_norm, z, fz):
                abs_res, res, fz_norm = self.residuals(k, z, fz, safe=True)
                if k == 1:
                    limits = _Limits.at_first_step(self.divergence_factor, abs_res, z, fz_norm)
                improved = torch.le(res, best_res, out=self.improved)
                active, n_active, n_improved, _ = self.stop(rule, k, limits, improved, False)
        if n_improved != batch:  # else the usual case: every sample improved, no masking needed
            res = torch.where(improved, res, best_res, out=self.best[k % 2])
        return limits, active, n_active, n_improved, improved, res

    def stop(
        self,
        solver: LoopSolver | None,
        k: int,
        limits: _Limits,
        improved: Tensor,
        all_active: bool,
    ) -> tuple[Tensor, int, int, float]:
        """Apply the stop rule after step ``k`` and read the counts back: the loop's one host sync.

        Writes who goes on into ``active[k]`` and returns it, the numbers of active and improved samples, and
        an overflow probe, the sum of the step's norms (non-finite whenever one of them is). Without a solver
        (a fixed count) every sample goes on. A sample past either of its ``limits`` stops.
        """
        act, active = self.active_rows[k - 1], self.active_rows[k]
        abs_row, size_row = self.abs_rows[k - 1], self.size_rows[k - 1]
        if solver is not None:
            above = solver.continues(self.res_rows[k - 1], abs_row, out=self._above)
            torch.logical_and(above, torch.le(abs_row, limits.residual, out=self._within), out=active)
            active.logical_and_(torch.le(size_row, limits.size, out=self._within))
            if not all_active:
                improved.logical_and_(act)
                active.logical_and_(act)
        slots, dtype = self._count_slots, self.abs.dtype
        torch.sum(active, dim=0, dtype=dtype, out=slots[0])
        torch.sum(improved, dim=0, dtype=dtype, out=slots[1])
        torch.sum(abs_row, dim=0, out=slots[2])
        torch.sum(size_row, dim=0, out=slots[3])
        counts = self._counts.tolist()
        return active, int(counts[0]), int(counts[1]), math.fsum(counts[2:])

    def stats(
        self,
        solver: LoopSolver,
        taken: int,
        best_res: Tensor,
        limits: _Limits | None,
        last: Tensor,
        autocast_dtype: torch.dtype | None,
    ) -> SolverStats:
        """Per-sample stats from the first ``taken`` steps."""
        res, act = self.res[:taken], self.active[:taken]
        best_res = best_res.clone()
        nstep = act.sum(dim=0)
        if solver.tol is None:
            nonfinite = ~torch.isfinite(last.detach()).all(dim=1)
            result = torch.where(nonfinite, Result.nonfinite, Result.successful)
        else:
            result = self._results(solver.tol, taken, nstep, best_res, limits)
        return SolverStats(
            nstep=nstep,
            residual=best_res,
            result=result.to(torch.int8),
            trace=torch.where(act, res, best_res),  # a stopped sample repeats its best residual
            tol=solver.tol,
            stop_mode=solver.stop_mode,
            max_iter=solver.max_iter,
            divergence_factor=solver.divergence_factor,
            solver=type(solver).__name__,
            autocast_dtype=autocast_dtype,
        )

    def _results(self, tol: float, taken: int, nstep: Tensor, best_res: Tensor, limits: _Limits) -> Tensor:
        """Result codes of an adaptive solve: reached tol, ran out of steps, diverged or non-finite.

        Diverged: past a limit when the sample stopped, or no progress at its best or its last iterate (see
        :meth:`_Limits.no_progress`).
        """
        res, abs_res, size, act = self.res[:taken], self.abs[:taken], self.size[:taken], self.active[:taken]
        stop = (nstep - 1).clamp_min(0).unsqueeze(0)  # the step at which each sample stopped
        last_res = res.gather(0, stop).squeeze(0)
        last_abs, last_size = abs_res.gather(0, stop).squeeze(0), size.gather(0, stop).squeeze(0)
        best = torch.where(act & ~torch.isnan(res), res, torch.inf).argmin(dim=0, keepdim=True)
        best_abs, best_size = abs_res.gather(0, best).squeeze(0), size.gather(0, best).squeeze(0)
        nonfinite = ~torch.isfinite(last_res)
        past_limit = (last_abs > limits.residual) | (last_size > limits.size)
        no_progress = limits.no_progress(best_size, best_abs) | limits.no_progress(last_size, last_abs)
        result = torch.full_like(nstep, Result.max_steps_reached)
        result = torch.where(best_res <= tol, Result.successful, result)
        result = torch.where(~nonfinite & (past_limit | no_progress), Result.diverged, result)
        return torch.where(nonfinite, Result.nonfinite, result)


def _scaled_norm(x: Tensor, *, inplace: bool) -> Tensor:
    """``||x||`` per row without overflow (squares of float32 entries above ~1e19 are inf): ``s ||x / s||``."""
    scale = torch.linalg.vector_norm(x, ord=torch.inf, dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, 1.0)
    scaled = x.div_(scale) if inplace else x / scale
    return torch.linalg.vector_norm(scaled, dim=1) * scale.squeeze(1)


def _overflowed(active: Tensor, res: Tensor, fz_norm: Tensor, z: Tensor, fz: Tensor) -> bool:
    """Some active sample's norm is not finite although its states are: it overflowed and is recomputed."""
    bad = ~torch.isfinite(res + fz_norm) & active
    if not bool(bad.any()):
        return False
    finite = torch.isfinite(z[bad]).all(dim=1) & torch.isfinite(fz[bad]).all(dim=1)
    return bool(finite.any())


def check_capture(capture: Iterable[int], max_iter: int) -> list[int]:
    """The distinct capture steps, ascending; each an integer in ``[1, max_iter]``."""
    steps = sorted({as_count("each capture step", k) for k in capture})
    if steps and (steps[0] < 1 or steps[-1] > max_iter):
        raise ValueError(
            f"capture steps must lie in [1, max_iter={max_iter}], got {steps}; raise max_iter or drop the "
            "later steps."
        )
    return steps
