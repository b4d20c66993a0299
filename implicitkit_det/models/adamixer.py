"""AdaMixer: a stack of decoder stages with their own weights, each one supervised."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from .detector import Outputs, QueryDetector, RefinementStage
from .queries import InitialQueries

__all__ = ["AdaMixer"]


class AdaMixer(QueryDetector):
    """``L`` explicit refinement stages from the initial queries: ``y_l = S_l(y_{l-1})``.

    Every stage's prediction is supervised (``stage0`` ... ``stage{L-1}``, equal weights); the last one is
    the detection. Each stage detaches its box input, so the box of stage ``l`` is trained only through
    stage ``l``'s regression, while the content carries gradients through the whole stack.

    Arguments:
        backbone, neck, queries, criterion, num_select: see :class:`~.detector.QueryDetector`.
        stages: the :class:`~.adamixer_stage.AdaMixerStage` modules, applied in order.

    Reference: Gao et al., "AdaMixer: a fast-converging query-based object detector", CVPR 2022.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        queries: InitialQueries,
        stages: Sequence[RefinementStage],
        **kwargs,
    ) -> None:
        super().__init__(backbone, neck, queries, **kwargs)
        self.stages = nn.ModuleList(stages)

    def refinement_layers(self) -> Iterator[nn.Module]:
        """The stages in order, then the last stage again: the only way a stack can run past its depth."""
        return itertools.chain(self.stages, itertools.repeat(self.stages[-1]))

    @property
    def training_depth(self) -> int:
        """The last stage."""
        return len(self.stages) - 1

    def training_branches(
        self, features: Sequence[Tensor], image_sizes: Tensor
    ) -> Iterator[dict[str, Outputs]]:
        """One group (the stages share one graph): ``{"stage0": ..., ..., "stage{L-1}": ...}``."""
        state = self.queries(image_sizes)
        outputs = {}
        for i, stage in enumerate(self.stages):
            state = stage(state, features, image_sizes)
            outputs[f"stage{i}"] = stage.predict(state, image_sizes)
        yield outputs

    def inference_outputs(self, features: Sequence[Tensor], image_sizes: Tensor) -> Outputs:
        """The last stage's prediction."""
        state = self.queries(image_sizes)
        for stage in self.stages:
            state = stage(state, features, image_sizes)
        return self.stages[-1].predict(state, image_sizes)
