"""DEQDet: an initial decoder layer, then one weight-tied refinement layer solved as a fixed point."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

from torch import Tensor, nn

import implicitkit as ik

from .adamixer_stage import AdaMixerStage
from .detector import Outputs, QueryDetector
from .queries import InitialQueries, QueryState
from .rap import RAP

__all__ = ["DEQDet"]


class DEQDet(QueryDetector):
    """Deep-equilibrium detector: ``y_0 = G(q_0)``, then the refinement ``y = F(y)`` iterated from ``y_0``.

    ``G`` (init layer) and ``F`` (refinement layer) are decoder layers with their own weights; ``F`` maps a
    query state to a query state with the image features fixed, so it is a fixed-point cell and the decoder
    is ``F``'s equilibrium reached from ``G``'s output. With :mod:`implicitkit`:

        sol = ik.fixed_point(lambda y: F(y, features, sizes), y_0,
                             solver=ik.FixedPointIteration(tol=None, max_iter=steps),  # exactly `steps`
                             gradient=ik.RAG(k=2), perturbation=RAP(), capture=...)

    **Inference** applies ``F`` exactly ``test_steps`` times (21) and predicts from that state.

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

    ``train_steps``, ``test_steps`` and ``supervise_steps`` are plain attributes, so they can be changed at
    run time (e.g. more refinement steps at test).

    **Arguments**
    - `backbone`, `neck`, `queries`, `criterion`, `num_select`: see :class:`~.detector.QueryDetector`.
    - `init_layer`: ``G``.
    - `refine_layer`: ``F``.
    - `train_steps`: no-grad solver steps in training.
    - `test_steps`: applications of ``F`` at inference.
    - `supervise_steps`: solver steps whose states get a RAG branch; each in ``1 .. train_steps``.
    - `init_refinements`: supervised grad-attached applications of ``F`` to ``y_0`` (2).
    - `rag_steps`: ``k`` of :class:`implicitkit.RAG`.
    - `perturbation`: applied on the training path: ``"rap"`` for a default :class:`~.rap.RAP`, any
      ``(state, step) -> state`` callable, or None.

    Reference: Wang et al., "Deep equilibrium object detection", ICCV 2023.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        queries: InitialQueries,
        init_layer: AdaMixerStage,
        refine_layer: AdaMixerStage,
        *,
        train_steps: int = 20,
        test_steps: int = 21,
        supervise_steps: Sequence[int] = (1, 3, 6, 9, 12, 20),
        init_refinements: int = 2,
        rag_steps: int = 2,
        perturbation: ik.Perturbation | Literal["rap"] | None = "rap",
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
        self.perturbation = RAP() if perturbation == "rap" else perturbation

    def solve(
        self,
        y0: QueryState,
        features: Sequence[Tensor],
        image_sizes: Tensor,
        steps: int,
        capture: Sequence[int] = (),
    ) -> ik.Solution:
        """Exactly ``steps`` undamped, no-grad iterations of ``F`` from ``sg(y0)``, perturbed in training.

        ``sol.last`` is ``F^steps(y0)``; ``sol.path[i]`` is the RAG branch ``F^k(sg(y_i))`` of the ``i``-th
        captured step, built when read (with its graph when autograd is on).
        """
        return ik.fixed_point(
            lambda y: self.refine_layer(y, features, image_sizes),
            y0,
            solver=ik.FixedPointIteration(tol=None, max_iter=steps),
            gradient=self.gradient,
            perturbation=self.perturbation if self.training else None,
            capture=capture,
        )

    def training_branches(
        self, features: Sequence[Tensor], image_sizes: Tensor
    ) -> Iterator[dict[str, Outputs]]:
        """``{init, init_f1, init_f2}`` (one graph through ``G``), then one group per ``rag_s{i}`` branch."""
        y0 = self.init_layer(self.queries(image_sizes), features, image_sizes)
        group = {"init": self.init_layer.predict(y0, image_sizes)}
        y = y0
        for k in range(1, self.init_refinements + 1):
            y = self.refine_layer(y, features, image_sizes)
            group[f"init_f{k}"] = self.refine_layer.predict(y, image_sizes)
        yield group
        sol = self.solve(y0, features, image_sizes, self.train_steps, self.supervise_steps)
        for step, state in zip(sol.path.steps, sol.path, strict=True):
            yield {f"rag_s{step}": self.refine_layer.predict(state, image_sizes)}

    def inference_outputs(self, features: Sequence[Tensor], image_sizes: Tensor) -> Outputs:
        """The prediction from ``F^test_steps(G(q_0))``."""
        state = self.init_layer(self.queries(image_sizes), features, image_sizes)
        if self.test_steps == 0:
            return self.init_layer.predict(state, image_sizes)
        state = self.solve(state, features, image_sizes, self.test_steps).last
        return self.refine_layer.predict(state, image_sizes)

    def extra_repr(self) -> str:
        return (
            f"train_steps={self.train_steps}, test_steps={self.test_steps}, "
            f"supervise_steps={self.supervise_steps}, gradient={self.gradient!r}, perturbation={self.perturbation!r}"
        )
