"""DEQDet: an initial decoder layer, then one weight-tied refinement layer solved as a fixed point."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

import implicitkit as ik

from .detector import Outputs, QueryDetector, RefinementStage
from .queries import InitialQueries, QueryState
from .rap import RAP

__all__ = ["DEQDet"]


class _Block(NamedTuple):
    """Rows of a stacked refinement: their starting state, how often ``F`` refines them, the branch they feed
    (``name`` formatted with the step ``t``) and whether it is read after every step or after the last."""

    name: str
    state: QueryState
    steps: int
    every_step: bool

    def read_at(self, t: int) -> bool:
        return t == self.steps or (self.every_step and t < self.steps)


class DEQDet(QueryDetector):
    """Deep-equilibrium detector: ``y_0 = G(q_0)``, then the refinement ``y = F(y)`` iterated from ``y_0``.

    ``G`` (init layer) and ``F`` (refinement layer) are decoder layers with their own weights; ``F`` maps a
    query state to a query state with the image features fixed, so it is a fixed-point cell and the decoder
    is ``F``'s equilibrium reached from ``G``'s output. With :mod:`implicitkit`:

        sol = ik.fixed_point(lambda y: F(y, features, sizes), y_0,
                             solver=ik.FixedPointIteration(tol=None, max_iter=steps),  # exactly `steps`
                             gradient=ik.RAG(k=2), perturbation=RAP(), capture=...)

    **Inference** applies ``F`` exactly ``test_steps`` times (21) and predicts from that state. With
    ``test_tol`` set, each image stops on its own once its refinement has converged (early exit, see
    :meth:`refine_to_tolerance`), after at most ``test_steps`` applications. Either way ``last_steps`` holds
    the applications of ``F`` each image of the last inference batch received (``[B]`` int64).

    **Training** supervises, each with its own Hungarian match and equal weight:

    | branch | state | gradient reaches |
    |---|---|---|
    | ``init`` | ``y_0 = G(q_0)`` | G, queries |
    | ``init_f1``, ``init_f2`` | ``F(y_0)``, ``F(F(y_0))`` | F and, through ``y_0``, G |
    | ``rag_s{i}`` | ``F(F(sg(y_i)))`` for ``i`` in ``supervise_steps`` (1, 3, 6, 9, 12, 20) | F |

    where ``y_i`` is the state after step ``i`` of ``train_steps`` (20) no-grad steps of ``F`` from
    ``sg(y_0)``, perturbed by RAP before every step. The last row is :class:`implicitkit.RAG` on the
    solver's path (``Solution.path``): the loss on the twice-refined state trains ``F`` to improve its own
    output, with ``(I - J)^-1`` replaced by ``I + J``. Backbone and neck receive the gradients of every
    branch.

    ``train_steps``, ``test_steps``, ``supervise_steps``, ``test_tol``, ``test_solver`` and
    ``test_stop_mode`` are plain attributes, so they can be changed at run time (e.g. more refinement steps
    at test, or early exit on a trained model).

    Arguments:
        backbone, neck, queries, criterion, num_select: see :class:`~.detector.QueryDetector`.
        init_layer: ``G``.
        refine_layer: ``F``.
        train_steps: no-grad solver steps in training.
        test_steps: applications of ``F`` at inference (the most, with `test_tol`).
        test_tol: None for exactly `test_steps` applications; else the per-image tolerance on the change
            of the query state (the RMS per query of the scaled state, see :meth:`refine_to_tolerance`).
        test_solver: with `test_tol`, ``"fixed"`` (plain iteration of ``F``) or ``"anderson"``
            (:class:`implicitkit.Anderson` on the scaled state).
        test_stop_mode: with `test_tol`, ``"abs"`` (the change itself) or ``"rel"`` (over the state's norm).
        stack_branches: compute every branch after ``y_0`` in one graph: the rows ``[y_0, sg(y_{i_1}), ...,
            sg(y_{i_n})]`` stacked along the batch axis and refined together, one application of ``F``
            per step on ``(1 + n) B`` images for ``init_f{t}`` and every ``rag_s{i}`` (fewer, larger operator
            calls; the same losses and gradients), with the memory of all branches at once instead of one
            group at a time. Faster where the decoder's time is per-operator overhead (the CPU-sized
            presets turn it on); off, peak memory stays that of one branch.
        supervise_steps: solver steps whose states get a RAG branch; each in ``1 .. train_steps``.
        init_refinements: supervised grad-attached applications of ``F`` to ``y_0`` (2).
        rag_steps: ``k`` of :class:`implicitkit.RAG`.
        perturbation: applied on the training path: ``"rap"`` for a default :class:`~.rap.RAP`, any
            ``(state, step) -> state`` callable, or None.

    Reference: Wang et al., "Deep equilibrium object detection", ICCV 2023.
    """

    #: what ``perturbation="rap"`` builds; a subclass with other layers names its own.
    default_perturbation: type = RAP

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        queries: InitialQueries,
        init_layer: RefinementStage,
        refine_layer: RefinementStage,
        *,
        train_steps: int = 20,
        test_steps: int = 21,
        supervise_steps: Sequence[int] = (1, 3, 6, 9, 12, 20),
        init_refinements: int = 2,
        rag_steps: int = 2,
        perturbation: ik.Perturbation | Literal["rap"] | None = "rap",
        test_tol: float | None = None,
        test_solver: Literal["fixed", "anderson"] = "fixed",
        test_stop_mode: Literal["abs", "rel"] = "abs",
        stack_branches: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(backbone, neck, queries, **kwargs)
        self.init_layer = init_layer
        self.refine_layer = refine_layer
        self.train_steps = train_steps
        self.test_steps = test_steps
        self.supervise_steps = tuple(supervise_steps)
        self.init_refinements = init_refinements
        self.gradient = ik.RAG(k=rag_steps)
        if isinstance(perturbation, str) and perturbation != "rap":
            raise ValueError(
                f"perturbation must be 'rap', a (state, step) -> state callable or None, got {perturbation!r}"
            )
        self.perturbation = self.default_perturbation() if perturbation == "rap" else perturbation
        self.test_tol = test_tol
        self.test_solver = test_solver
        self.test_stop_mode = test_stop_mode
        self.stack_branches = stack_branches
        self.last_steps: Tensor | None = None
        check_test_settings(self.test_settings)

    def refinement_layers(self) -> Iterator[nn.Module]:
        """``G``, then ``F`` again and again."""
        return itertools.chain([self.init_layer], itertools.repeat(self.refine_layer))

    @property
    def training_depth(self) -> int:
        """The no-grad solver steps of training."""
        return self.train_steps

    @property
    def test_settings(self) -> dict[str, Any]:
        """``test_steps``, ``test_tol`` and ``test_solver``."""
        return {"test_steps": self.test_steps, "test_tol": self.test_tol, "test_solver": self.test_solver}

    def configure_test(self, **settings: Any) -> None:
        """Change the test-time settings together; values that cannot run are refused, nothing changed."""
        before = self.test_settings
        try:
            super().configure_test(**settings)
            check_test_settings(self.test_settings)
        except ValueError:
            for name, value in before.items():
                setattr(self, name, value)
            raise

    def solve(
        self,
        y0: QueryState,
        features: Sequence[Tensor],
        image_sizes: Tensor,
        steps: int,
        capture: Sequence[int] = (),
        *,
        perturbed: bool = True,
    ) -> ik.Solution:
        """Exactly ``steps`` undamped, no-grad iterations of ``F`` from ``sg(y0)``, perturbed in training
        (unless `perturbed` is false: inference never is, whatever the mode).

        ``sol.last`` is ``F^steps(y0)``; ``sol.path[i]`` is the RAG branch ``F^k(sg(y_i))`` of the ``i``-th
        captured step, built when read (with its graph when autograd is on).
        """
        return ik.fixed_point(
            lambda y: self.refine_layer(y, features, image_sizes),
            y0,
            # A fixed count only fails on NaN, which the training loop's loss check already reports.
            solver=ik.FixedPointIteration(tol=None, max_iter=steps, on_failure="report"),
            gradient=self.gradient,
            perturbation=self.perturbation if self.training and perturbed else None,
            capture=capture,
        )

    def training_branches(
        self, features: Sequence[Tensor], image_sizes: Tensor
    ) -> Iterator[dict[str, Outputs]]:
        """``{init, init_f1, init_f2}`` (one graph through ``G``), then one group per ``rag_s{i}`` branch; or,
        stacked (``stack_branches``), one group of every branch."""
        # The attributes may have changed since the config's check.
        check_supervise_steps(type(self).__name__, tuple(self.supervise_steps), self.train_steps)
        y0 = self.init_layer(self.queries(image_sizes), features, image_sizes)
        init = {"init": self.init_layer.predict(y0, image_sizes)}
        if self.stack_branches:
            sol = self.solve(y0, features, image_sizes, self.train_steps, self.supervise_steps)
            yield {**init, **self._stacked_branches(y0, sol.path, features, image_sizes)}
            return
        group, y = init, y0
        for k in range(1, self.init_refinements + 1):
            y = self.refine_layer(y, features, image_sizes)
            group[f"init_f{k}"] = self.refine_layer.predict(y, image_sizes)
        yield group
        sol = self.solve(y0, features, image_sizes, self.train_steps, self.supervise_steps)
        for step, state in zip(sol.path.steps, sol.path, strict=True):
            yield {f"rag_s{step}": self.refine_layer.predict(state, image_sizes)}

    def _stacked_branches(
        self, y0: QueryState, path: ik.Path, features: Sequence[Tensor], image_sizes: Tensor
    ) -> dict[str, Outputs]:
        """``init_f{t}`` and every ``rag_s{i}`` from one evaluation of ``F`` per step on stacked rows.

        Each block of ``B`` rows starts from its own state (``y_0``, or RAG's ``sg(y_i)``) and is refined as
        many times as its branch needs (``init_refinements``, ``rag_steps``); the blocks that refine longest
        come first, so the rows still refining at any step are a prefix of the stack.
        """
        blocks = self._stack_blocks(y0, path)
        if not blocks:
            return {}
        b, count = image_sizes.shape[0], len(blocks)
        state = {key: torch.cat([block.state[key] for block in blocks]) for key in y0}
        # A layer that reads stacked rows from the images' own maps is given them; any other, a copy per block.
        shared = getattr(self.refine_layer, "reads_stacked_rows", False)
        maps = list(features) if shared else [level.repeat(count, 1, 1, 1) for level in features]
        sizes = image_sizes.repeat(count, 1)
        outputs: dict[str, Outputs] = {}
        for t in range(1, blocks[0].steps + 1):
            rows = b * sum(block.steps >= t for block in blocks)
            if rows < len(sizes):  # only once blocks are done: a slice's backward writes a zero-filled copy
                state, sizes = {key: value[:rows] for key, value in state.items()}, sizes[:rows]
                maps = maps if shared else [level[:rows] for level in maps]
            state = self.refine_layer(state, maps, sizes)
            read = [j for j, block in enumerate(blocks) if block.read_at(t)]
            if read:  # adjacent blocks: one prediction for all of them
                lo, hi = b * read[0], b * (read[-1] + 1)
                predicted = self.refine_layer.predict({k: v[lo:hi] for k, v in state.items()}, sizes[lo:hi])
                for j in read:
                    rows_j = slice(b * j - lo, b * (j + 1) - lo)
                    outputs[blocks[j].name.format(t=t)] = {k: v[rows_j] for k, v in predicted.items()}
        order = [f"init_f{t}" for t in range(1, self.init_refinements + 1)]
        order += [f"rag_s{i}" for i in path.steps]
        return {name: outputs[name] for name in order}

    def _stack_blocks(self, y0: QueryState, path: ik.Path) -> list[_Block]:
        """``y_0`` (refined ``init_refinements`` times) and each captured ``sg(y_i)`` (``rag_steps`` times),
        longest first."""
        blocks = [_Block("init_f{t}", y0, self.init_refinements, True)] if self.init_refinements else []
        for step, state in zip(path.steps, path.states(), strict=True):
            detached = {key: value.detach() for key, value in state.items()}  # RAG's sg(y_i)
            blocks.append(_Block(f"rag_s{step}", detached, self.gradient.k, False))
        return sorted(blocks, key=lambda block: -block.steps)

    def inference_outputs(self, features: Sequence[Tensor], image_sizes: Tensor) -> Outputs:
        """The prediction from ``F^test_steps(G(q_0))``, or from each image's converged state with `test_tol`."""
        # Also when they were set as attributes, which configure_test would have checked.
        check_test_settings(self.test_settings)
        state = self.init_layer(self.queries(image_sizes), features, image_sizes)
        batch = image_sizes.shape[0]
        if self.test_steps == 0:
            self.last_steps = torch.zeros(batch, dtype=torch.int64, device=image_sizes.device)
            return self.init_layer.predict(state, image_sizes)
        if self.test_tol is None:
            state = self.solve(state, features, image_sizes, self.test_steps, perturbed=False).last
            self.last_steps = torch.full(
                (batch,), self.test_steps, dtype=torch.int64, device=image_sizes.device
            )
        else:
            state, self.last_steps = self.refine_to_tolerance(state, features, image_sizes)
        return self.refine_layer.predict(state, image_sizes)

    def refine_to_tolerance(
        self, y0: QueryState, features: Sequence[Tensor], image_sizes: Tensor
    ) -> tuple[QueryState, Tensor]:
        """Iterate ``F`` from `y0` until each image's state changes by at most ``test_tol`` (early exit).

        The state mixes pixels (``x, y``), log-scales (``z, r``) and LayerNorm'd content, so the solver
        works on a scaled copy in which every part of a query is of order one:

            s(y) = (content / sqrt(dim),  x / w,  y / h,  z,  r) / sqrt(N)

        with ``(h, w)`` the image's size and ``N`` the queries. The residual ``||s(F(y)) - s(y)||`` of an
        image is then the root-mean-square over its queries of the content change relative to the
        content's own RMS (1 after LayerNorm), plus the box centre's move as a fraction of the image, plus
        the change of ``log2`` scale and aspect. Each image stops at the first step where it is at most
        ``test_tol`` (``test_stop_mode="abs"``; ``"rel"`` divides by ``||s(F(y))||``) and is then frozen,
        so its steps and its detections do not depend on the other images of the batch.

        The state kept is the solver's ``Solution.last``: each image's final iterate, ``F`` applied
        ``nstep`` times (with Anderson, the iterate it stopped at), as in the fixed-count mode; no
        gradient estimator runs (``Solution.value`` would add RAG's two applications).

        Returns:
            ``(state, steps)``: the converged state and the ``[B]`` applications of ``F`` per image.
        """
        content = y0["content"]
        dim, queries = content.shape[-1], content.shape[-2]
        hw = image_sizes.to(content.dtype)
        box_scale = torch.stack(
            [hw[:, 1], hw[:, 0], torch.ones_like(hw[:, 0]), torch.ones_like(hw[:, 0])], -1
        )
        box_scale = box_scale[:, None, :] * math.sqrt(queries)  # [B, 1, 4]
        content_scale = math.sqrt(dim * queries)

        def scaled(y: QueryState) -> QueryState:
            return {**y, "content": y["content"] / content_scale, "xyzr": y["xyzr"] / box_scale}

        def unscaled(y: QueryState) -> QueryState:
            return {**y, "content": y["content"] * content_scale, "xyzr": y["xyzr"] * box_scale}

        # Samples that use the whole step budget are counted in the evaluation's steps per image, not warned of.
        options = {
            "tol": self.test_tol,
            "max_iter": self.test_steps,
            "stop_mode": self.test_stop_mode,
            "on_failure": "report",
        }
        if self.test_solver == "fixed":
            solver: ik.Solver = ik.FixedPointIteration(**options)
        elif self.test_solver == "anderson":
            solver = ik.Anderson(**options)
        else:
            raise ValueError(f"test_solver must be 'fixed' or 'anderson', got {self.test_solver!r}")
        sol = ik.fixed_point(
            lambda y: scaled(self.refine_layer(unscaled(y), features, image_sizes)),
            scaled(y0),
            solver=solver,
            gradient=self.gradient,
        )
        return unscaled(sol.last), sol.stats.nstep.to(torch.int64)

    def extra_repr(self) -> str:
        return (
            f"train_steps={self.train_steps}, test_steps={self.test_steps}, test_tol={self.test_tol}, "
            f"test_solver={self.test_solver!r}, "
            f"supervise_steps={self.supervise_steps}, gradient={self.gradient!r}, perturbation={self.perturbation!r}"
        )


def check_test_settings(settings: dict[str, Any]) -> None:
    """Refuse test-time settings that would fail at inference or silently do nothing."""
    steps, tol, solver = settings["test_steps"], settings["test_tol"], settings["test_solver"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(
            f"test_steps={steps!r}: give the number of applications of F at inference, 0 or more"
        )
    if tol is not None and not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(
            f"test_tol={tol!r}: give a tolerance >= 0, or None for exactly test_steps applications"
        )
    if solver not in ("fixed", "anderson"):
        raise ValueError(f"test_solver={solver!r}: choose 'fixed' or 'anderson'")
    if solver == "anderson" and tol is None:
        raise ValueError(
            "test_solver='anderson' solves to test_tol, and no test_tol is set: F would be applied exactly "
            "test_steps times and no solver would run. Give test_tol too, or keep test_solver='fixed'"
        )


def check_supervise_steps(owner: str, steps: tuple[int, ...], train_steps: int) -> None:
    """Refuse supervised steps outside ``1 .. train_steps``; `owner` names where they are set."""
    outside = [step for step in steps if not 1 <= step <= train_steps]
    if outside:
        raise ValueError(
            f"{owner}.supervise_steps={steps}: {outside} outside 1 .. train_steps={train_steps} (each branch "
            "starts from the state after that training step); drop them or raise train_steps"
        )
