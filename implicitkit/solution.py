"""The result of a fixed-point solve: value, stats, supervised path and backward stats."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._tree import State
from .stats import AdjointStats, SolverStats


class Path(Sequence):
    """States after chosen solver steps, each passed through the gradient estimator when accessed.

    A branch is built when it is indexed (one graph per access, nothing is cached), so a loop that
    back-propagates each branch's loss before touching the next keeps at most one branch graph alive, and
    peak memory does not grow with the number of branches::

        for z in sol.path:
            criterion(z).backward()  # this branch's graph is freed here

    :meth:`backward` is that loop. Inputs that every branch shares (backbone features) need
    :class:`~implicitkit.SharedInputs`, or the first backward frees their graph for the others.

    Attributes:
        steps: the solver steps captured, ascending.
        shared_graph: the branches share one graph with the value (the solver ran with autograd, as with
            :class:`~implicitkit.Unrolled`); :meth:`backward` then retains it, for the value's loss, and memory
            grows with the solver's steps whatever the branches do.
    """

    def __init__(
        self,
        steps: Sequence[int],
        make_branch: Callable[[int], State],
        *,
        shared_graph: bool = False,
        make_stacked: Callable[[Callable[[State], State]], State] | None = None,
        make_states: Callable[[], list[State]] | None = None,
    ) -> None:
        self.steps = tuple(steps)
        self.shared_graph = shared_graph
        self._make_branch = make_branch
        self._make_stacked = make_stacked
        self._make_states = make_states
        self._bind: Callable[[Callable], Callable] = lambda f: f

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._make_branch(k) for k in self.steps[index]]
        return self._make_branch(self.steps[index])

    def stacked(self, f_stacked: Callable[[State], State]) -> State:
        """Every branch in one graph, built by one evaluation of the map per estimator step.

        The captured states ``z_{s_1}, ..., z_{s_n}`` (each ``[B, ...]``) are concatenated along the batch
        axis and passed through the gradient estimator with `f_stacked`, the solve's map for that stacked
        batch of ``n B`` samples: ``f_stacked(cat(z_1, ..., z_n)) = cat(f(z_1), ..., f(z_n))``, e.g. ``f`` with
        its per-sample inputs repeated ``n`` times (``x.repeat(n, 1)``). Branch ``i`` is rows ``i B .. (i+1) B``
        of the result (``state.chunk(n)`` on each leaf), equal to ``self[i]`` with its gradients.

        For a map whose cost is per-op overhead rather than arithmetic (small batches), this is ``n`` times
        fewer operator calls forward and backward; the price is memory: all ``n`` branch graphs exist at once,
        where indexing the path one branch at a time keeps one.

        Returns:
            The branches' states stacked along the batch axis, ``[n B, ...]`` per leaf, in the order of
            :attr:`steps`.
        """
        if not self.steps:
            raise ValueError("the path is empty: pass capture=... to fixed_point to supervise solver steps")
        if self._make_stacked is None:
            raise NotImplementedError(
                "this path cannot stack its branches (its estimator builds a branch from more than the state, "
                "as Reversible does); index the path one branch at a time instead"
            )
        return self._make_stacked(self._bind(f_stacked))

    def _bind_maps(self, bind: Callable[[Callable], Callable]) -> None:
        """Run the maps given to :meth:`stacked` through ``bind``: :class:`~implicitkit.DEQ` binds them to
        its solve's per-solve states (masks, normalised weights), as it binds the branches' own map."""
        self._bind = bind

    def states(self) -> list[State]:
        """The captured states ``z_{s_1}, ..., z_{s_n}`` themselves, as the solver left them: no estimator applied.

        For a caller that builds the branches itself, e.g. RAG's ``f^k(sg(z_{s_i}))`` stacked with other
        states that ``f`` refines in the same evaluations. With a solve that ran without autograd they carry
        no graph; with :attr:`shared_graph` they carry the solve's.
        """
        if self._make_states is None:
            raise NotImplementedError("this path does not keep its captured states")
        return self._make_states()

    def backward(self, loss_fn: Callable[[State], Tensor], weights: Sequence[float] | None = None) -> Tensor:
        """Back-propagate ``weights[i] * loss_fn(branch_i)`` one branch at a time; return the losses.

        Gradients accumulate in ``.grad`` exactly as for ``sum_i weights[i] * loss_fn(branch_i)`` in one
        graph, while only one branch graph exists at a time.

        Arguments:
            loss_fn: maps a branch's state to a scalar loss.
            weights: one weight per captured step; default all 1.

        Returns:
            The detached weighted losses, shape ``[len(self)]``.
        """
        if weights is not None and len(weights) != len(self):
            raise ValueError(f"Got {len(weights)} weights for {len(self)} captured steps {self.steps}.")
        losses = []
        for i in range(len(self)):
            loss = loss_fn(self[i])
            if weights is not None:
                loss = weights[i] * loss
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}.")
            if not loss.requires_grad:
                raise RuntimeError(
                    f"The loss of the branch at step {self.steps[i]} has no graph: build the path with "
                    "gradients enabled and make loss_fn depend on the state."
                )
            try:
                loss.backward(retain_graph=self.shared_graph)
            except RuntimeError as err:
                if i == 0 or "backward through the graph a second time" not in str(err):
                    raise
                raise RuntimeError(
                    f"The branch at step {self.steps[i]} reaches a graph that the branch at step {self.steps[0]}'s "
                    "backward already freed: an input of the map carries its own graph (an encoder's output). "
                    "Pass such inputs through ik.SharedInputs, which gives the branches leaf copies and delivers "
                    "their summed gradient with one backward (see docs/path_supervision.md)."
                ) from err
            losses.append(loss.detach())
        return torch.stack(losses) if losses else torch.zeros(0)

    def __repr__(self) -> str:
        return f"Path(steps={self.steps})"


_UNREAD = object()


@dataclass(eq=False)
class Solution:
    """What :func:`~implicitkit.fixed_point` returns; unpacks as ``value, stats = solution``.

    A dataclass and a registered pytree node, so ``DistributedDataParallel`` (with or without
    ``find_unused_parameters``) and ``torch.utils._pytree`` see the tensors inside.

    Attributes:
        value: the best iterate (lowest residual) passed through the gradient estimator: same structure as
            ``z0``, with the estimator's gradient when autograd was on at the call. Built when first read
            (and then kept), so a caller that only needs ``last`` or ``path`` never pays for it; the grad mode
            and autocast are the call's, whatever those of the read, and a first read after an optimizer
            stepped a parameter it reads is refused (``f`` is no longer the solve's); so is a path branch.
            (A call under ``inference_mode`` keeps no way to tell which parameters: any step refuses.) So is a
            first read after ``last`` or a path state, which may share the returned state's storage, was
            changed in place. A change made in place to what ``f`` reads by other means (a hand-written
            update under ``no_grad``, ``x.copy_(next_batch)``) is not seen: the value is then built from the
            changed tensors, so read it before such a change.
        last: the final iterate as the solver left it, without an estimator: detached, except under
            :class:`~implicitkit.Unrolled`. With ``tol=None`` it is exactly the ``max_iter``-th iterate.
        stats: the forward solve's :class:`~implicitkit.SolverStats` (per-sample ``nstep``, ``residual``,
            ``result`` codes, ``trace``).
        path: the states after the requested ``capture`` steps (:class:`Path`), empty when none were asked.
        backward_stats: the :class:`~implicitkit.AdjointStats` of every adjoint solve run by backward passes
            through this solution or its path (IFT), appended as they happen.
        aux: with ``has_aux=True``, the auxiliary output of the evaluation of ``f`` that belongs to ``value``
            (which one depends on the estimator, see ``GradientEstimator.attach_with_aux``), with its graph,
            so gradients reach it as they reach ``value``; built with ``value``. ``None`` without ``has_aux``.
    """

    stats: SolverStats
    last: State
    path: Path
    backward_stats: list[AdjointStats] = field(default_factory=list)
    _value: Any = field(default=_UNREAD, repr=False)
    _aux: Any = field(default=None, repr=False)
    _make_value: Callable[[], tuple[State, Any]] | None = field(default=None, repr=False)

    @property
    def value(self) -> State:
        if self._value is _UNREAD:
            self._value, self._aux = self._make_value()
            self._make_value = None
        return self._value

    @property
    def aux(self) -> Any:
        self.value  # noqa: B018 (value and aux are built together)
        return self._aux

    def __iter__(self) -> Iterator:
        yield self.value
        yield self.stats

    def __repr__(self) -> str:
        return f"Solution({self.stats.summary()}, path={self.path.steps})"


def _flatten_solution(sol: Solution):
    # The aux is a child only when there is one, so a solution without has_aux keeps two children.
    has_aux = sol.aux is not None
    children = [sol.value, sol.last, sol.aux] if has_aux else [sol.value, sol.last]
    return children, (sol.stats, sol.path, sol.backward_stats, has_aux)


def _unflatten_solution(children, context) -> Solution:
    stats, path, backward_stats, has_aux = context
    value, last, aux = children if has_aux else (*children, None)
    return Solution(stats, last, path, backward_stats, _value=value, _aux=aux)


pytree.register_pytree_node(
    Solution, _flatten_solution, _unflatten_solution, serialized_type_name="implicitkit.Solution"
)
