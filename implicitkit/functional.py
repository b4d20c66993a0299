"""``fixed_point``: solve ``z = f(z)`` as the gradient estimator says, then attach its gradient."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack

from ._call_state import CallState
from ._compile import not_compiled
from ._tree import State, StateSpec, flatten, leaves_of, spec_of, tree_map, unflatten
from .gradients import IFT, GradientEstimator
from .perturbation import Perturbation
from .solution import Path, Solution
from .solvers import Anderson, Solver, SolveResult
from .solvers.loop import check_capture
from .stats import Result, SolverStats, apply_failure_policy

__all__ = ["Perturbation", "fixed_point"]


# torch.compile: a solve is a data-dependent loop (each sample stops on its own, read on the host) around
# autograd machinery Dynamo cannot trace (custom backward passes that solve, graph walks). Tracing into it
# breaks the graph at every host read and recompiles per step index; running the whole solve, and the
# gradient attached to its result, outside the compiled graph costs one clean break instead (two when the
# value is read after the call) and leaves the model around the solve compiled. See docs/gradients.md.
@not_compiled
def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    solver: Solver | None = None,
    gradient: GradientEstimator | None = None,
    perturbation: Perturbation | None = None,
    capture: Iterable[int] = (),
    has_aux: bool = False,
) -> Solution:
    """Find ``z* = f(z*)`` from ``z0`` and return it with a gradient estimate attached.

    The estimator decides how the solve runs: all but :class:`~implicitkit.Unrolled` run it without
    autograd, so memory does not grow with its steps, and rebuild what backward needs from ``z*``. Gradients
    reach every parameter and input that ``f`` closes over.

    Arguments:
        f: maps a state to a state of the same structure: a tensor ``[B, ...]`` or a tuple/list/dict of
            tensors whose first dimension is the batch ``B``. Samples must not interact inside ``f``, and ``f``
            must return new tensors, not change its input in place (refused: the input is the solver's iterate).
        z0: the starting state. An empty batch (``B = 0``), or a state of no elements per sample, returns
            ``z0`` without solving (with ``has_aux``, ``f`` is called once on it, for its aux).
        solver: default ``Anderson()``; ``tol=None`` on any solver is a fixed count of ``max_iter`` steps.
        gradient: default ``IFT()``.
        perturbation: ``(state, step) -> state`` applied before each solver step (steps count from 1); pass it
            in training only (:class:`~implicitkit.DEQ` does this for you).
        capture: solver steps after which to keep the state for path supervision: ``Solution.path`` holds
            the state after each (ascending, ``Solution.path.steps``) passed through ``gradient``, built when
            accessed (see ``docs/path_supervision.md``).
        has_aux: ``f`` returns a pair ``(state, aux)``, ``aux`` any output besides the state (a tensor, a
            pytree of tensors, anything). The solver iterates on the state only; ``Solution.aux`` is the aux
            of the evaluation that belongs to ``value``, with its graph: for IFT, Neumann and Unrolled one more
            evaluation of ``f`` at the returned ``z*``, for JFB, Phantom and RAG their last grad-attached
            application. Path branches hold states only.

    Returns:
        A :class:`Solution`: ``value, stats = fixed_point(...)``; also ``.last``, ``.path`` and ``.aux``.
    """
    check_parts(solver, gradient, perturbation)
    solver = solver if solver is not None else Anderson()
    gradient = gradient if gradient is not None else IFT()
    _refuse_vmap()
    f_aux = _pair_checked(f) if has_aux else None
    f_state = (lambda z: f_aux(z)[0]) if has_aux else f
    spec = spec_of(z0)
    if spec.batch_size == 0 or sum(spec.sizes) == 0:  # nothing to solve for (e.g. zero queries)
        return _empty_solution(z0, solver, capture, f_aux, spec.batch_size)

    call = CallState(leaves_of(z0)[0][0].device.type)  # before the solve, whose graph it may build
    result = _solve_flat(solver, gradient, f_state, z0, spec, perturbation, capture)
    backward_stats: list = []

    def attach(step):
        return gradient.attach_result(f_state, result, step, spec, backward_stats.append)

    # The value is built once, at its first read, and kept: under the modes of the call, not of that read (a
    # no-grad log line must not drop the graph). Path branches are built anew at each access, under the
    # access's modes. Either is refused if an optimizer stepped a parameter it reads since the call.

    # `last` and the path's states may share storage with the returned state: a change made to one of them in
    # place before the value or a branch is built would be built into it.
    versions = {id(t): t._version for t in (result.value, *result.captured.values()) if not t.is_inference()}

    def unchanged(state: Tensor, what: str) -> None:
        if id(state) in versions and state._version != versions[id(state)]:
            raise RuntimeError(SHARED_STATE_CHANGED_MESSAGE.format(what=what))

    def value_and_aux():
        unchanged(result.value, "Solution.value")
        if f_aux is None:
            return call.build(lambda: (attach(None), None), "Solution.value")
        return call.build(
            lambda: gradient.attach_result_with_aux(f_aux, result, spec, backward_stats.append),
            "Solution.value",
        )

    def branch(step):
        unchanged(result.captured[step], f"The path branch of step {step}")
        return call.branch(lambda: attach(step), "A Solution.path branch")

    def attach_stacked(f_stacked):
        steps = sorted(result.captured)
        for s in steps:
            unchanged(result.captured[s], "Solution.path.stacked")
        stacked = tree_map(
            lambda *leaves: torch.cat(leaves), *(unflatten(result.captured[s], spec) for s in steps)
        )
        return call.branch(
            lambda: gradient.attach(f_stacked, stacked, backward_stats.append), "Solution.path.stacked"
        )

    # An estimator that reads more than the captured state (Reversible) cannot build branches from a stack.
    stackable = type(gradient).attach_result is GradientEstimator.attach_result
    shared_graph = any(x.requires_grad for x in result.captured.values())
    # Built on first access, which may come from compiled code: they run outside the graph like the solve.
    path = Path(
        sorted(result.captured),
        not_compiled(branch),
        shared_graph=shared_graph,
        make_stacked=not_compiled(attach_stacked) if stackable else None,
        make_states=lambda: [unflatten(result.captured[s], spec) for s in sorted(result.captured)],
    )
    return Solution(
        result.stats,
        unflatten(result.last, spec),
        path,
        backward_stats,
        _make_value=not_compiled(value_and_aux),
    )


def check_parts(solver: object, gradient: object, perturbation: object = None) -> None:
    """Refuse a class given for a solver or estimator (``ik.Anderson`` for ``ik.Anderson()``), or a name."""
    for name, value, kind, example in (
        ("solver", solver, Solver, "ik.Anderson(tol=1e-4)"),
        ("gradient", gradient, GradientEstimator, "ik.IFT()"),
    ):
        if isinstance(value, (type, str)):  # an object that only acts like one is left to its own devices
            shown = f"the class {value.__name__}" if isinstance(value, type) else repr(value)
            raise TypeError(f"{name} must be a {kind.__name__} instance such as {example}, got {shown}.")
    if perturbation is not None and not callable(perturbation):
        raise TypeError(f"perturbation must be callable (state, step) -> state, got {perturbation!r}.")


def _solve_flat(
    solver: Solver,
    gradient: GradientEstimator,
    f: Callable[[State], State],
    z0: State,
    spec: StateSpec,
    perturbation: Perturbation | None,
    capture: Iterable[int],
) -> SolveResult:
    """Run the solve as ``gradient`` says on flat ``[B, D]`` states, then apply the solver's failure policy
    (the one place a solve's failures raise or warn)."""

    def f_flat(z: Tensor) -> Tensor:
        return _left_unchanged(z, lambda: flatten(f(unflatten(z, spec)), spec), IN_PLACE_MESSAGE)

    flat_perturbation = None
    if perturbation is not None:

        def flat_perturbation(z: Tensor, step: int) -> Tensor:
            moved = lambda: flatten(perturbation(unflatten(z, spec), step), spec)  # noqa: E731
            return _left_unchanged(z, moved, PERTURBATION_IN_PLACE_MESSAGE)

    with _forward_mode_refused():
        result = gradient.solve(
            solver, f_flat, flatten(z0, spec), perturbation=flat_perturbation, capture=capture
        )
    apply_failure_policy(solver.on_failure, result.stats)
    return result


def _left_unchanged(z: Tensor, compute: Callable[[], Tensor], message: str) -> Tensor:
    """``compute()``, refused with `message` if it changed `z` in place: `z` is the solver's own iterate,
    whose leaves the cell and the perturbation get as views (inference tensors keep no version)."""
    version = None if z.is_inference() else z._version
    out = compute()
    if version is not None and z._version != version:
        raise RuntimeError(message)
    return out


IN_PLACE_MESSAGE = (
    "The cell changed its input state in place (e.g. `z += ...` or `z.mul_(...)`): the state it receives is "
    "the solver's own iterate, so the residual would read 0 and the solve stop at once, wrongly converged. "
    "Return a new tensor instead (`z = z + ...`)."
)
SHARED_STATE_CHANGED_MESSAGE = (
    "{what} is built from a state of the solve that was changed in place after the call (Solution.last and "
    "the path's states may share its storage): it would be built from the changed values. Read {what} "
    "before such a change, or change a copy (sol.last.clone())."
)
PERTURBATION_IN_PLACE_MESSAGE = (
    "The perturbation changed the state it was given in place (e.g. `z.add_(...)`): that state is the "
    "solver's own iterate, which the caller's z0, the returned value and the path may share (they may have "
    "changed with it). Return a new tensor instead (`z + noise`)."
)


def _refuse_vmap() -> None:
    interpreter = peek_interpreter_stack()
    if interpreter is not None and interpreter.key() == TransformType.Vmap:
        raise RuntimeError(
            "fixed_point cannot run under torch.func.vmap: every sample stops on its own, which needs its "
            "residual read on the host. Put the samples in the state's first (batch) dimension instead; the "
            "solver already treats each one independently, with its own stopping and stats."
        )


@contextlib.contextmanager
def _forward_mode_refused() -> Iterator[None]:
    """Turn PyTorch's internal error for dual tensors in a solver step (a safety net) into the library's own."""
    try:
        yield
    except NotImplementedError as error:
        if "forward AD" not in str(error):
            raise
        raise RuntimeError(
            "fixed_point could not run this solve in forward mode (torch.func.jvp, jacfwd, "
            "torch.autograd.forward_ad): a step of the solver writes into preallocated buffers, which dual "
            "tensors cannot pass through. Use an estimator that solves on primals and attaches the tangent "
            "after (IFT, Neumann, JFB, Phantom, RAG), or differentiate in reverse mode."
        ) from error


def _pair_checked(f: Callable[[State], Any]) -> Callable[[State], tuple[State, Any]]:
    """``f`` of ``has_aux=True``, raising a clear error when it does not return a ``(state, aux)`` pair."""

    def f_aux(z):
        out = f(z)
        if not (isinstance(out, tuple) and len(out) == 2):
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else f"a {type(out).__name__}"
            raise TypeError(
                f"With has_aux=True the map must return a pair (state, aux), but it returned {got}. Return "
                "`new_state, aux` (aux may be any object), or drop has_aux=True if there is no auxiliary output."
            )
        return out

    return f_aux


def _empty_solution(
    z0: State,
    solver: Solver,
    capture: Iterable[int],
    f_aux: Callable[[State], tuple[State, Any]] | None,
    batch: int,
) -> Solution:
    """The solution of a state without elements (``B = 0``, or ``B`` samples of no features): ``z0`` itself
    (the only point there is), with its structure, and stats of ``B`` samples solved in 0 steps.

    With ``has_aux`` the map is evaluated once on the empty state, for its aux.
    """
    device = leaves_of(z0)[0][0].device
    stats = SolverStats(
        nstep=torch.zeros(batch, dtype=torch.long, device=device),
        residual=torch.zeros(batch, device=device),
        result=torch.full((batch,), Result.successful, dtype=torch.int8, device=device),
        trace=torch.zeros(0, batch, device=device),
        tol=solver.tol,
        stop_mode=solver.stop_mode,
        max_iter=solver.max_iter,
        divergence_factor=solver.divergence_factor,
        solver=type(solver).__name__,
    )
    steps = check_capture(capture, solver.max_iter)
    aux = None if f_aux is None else f_aux(z0)[1]
    return Solution(
        stats, z0, Path(steps, lambda k: z0, make_states=lambda: [z0] * len(steps)), _value=z0, _aux=aux
    )
