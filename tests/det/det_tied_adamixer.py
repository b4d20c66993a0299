"""A detector added the way docs/adding_a_detector.md says: this one model file and one table row.

``TiedAdaMixer`` applies one AdaMixer stage ``num_stages`` times (the weights shared), every application
supervised: an explicit stack with the parameters of one layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from implicitkit_det.models import (
    AdaMixerStage,
    Architecture,
    ChannelMapper,
    DemoRecipe,
    InitialQueries,
    ModelConfig,
    OptimizerRecipe,
    QueryDetector,
    RefinementStage,
    register_detector,
)
from implicitkit_det.models.configs import TINY, make_backbone
from implicitkit_det.models.detector import Outputs


class TiedAdaMixer(QueryDetector):
    """``y_l = S(y_{l-1})`` for ``l = 1 .. L`` with one stage ``S``; each ``y_l`` supervised (``step{l}``)."""

    def __init__(
        self, backbone: nn.Module, neck: nn.Module, queries: InitialQueries, stage: RefinementStage, depth: int,
        **kwargs,
    ) -> None:  # fmt: skip
        super().__init__(backbone, neck, queries, **kwargs)
        self.stage, self.depth = stage, depth

    def training_branches(
        self, features: Sequence[Tensor], image_sizes: Tensor
    ) -> Iterator[dict[str, Outputs]]:
        state, outputs = self.queries(image_sizes), {}
        for step in range(self.depth):
            state = self.stage(state, features, image_sizes)
            outputs[f"step{step}"] = self.stage.predict(state, image_sizes)
        yield outputs

    def inference_outputs(self, features: Sequence[Tensor], image_sizes: Tensor) -> Outputs:
        state = self.queries(image_sizes)
        for _ in range(self.depth):
            state = self.stage(state, features, image_sizes)
        return self.stage.predict(state, image_sizes)

    def refinement_layers(self) -> Iterator[nn.Module]:
        return itertools.repeat(self.stage)

    @property
    def training_depth(self) -> int:
        return self.depth - 1


def build_tied_adamixer(cfg: ModelConfig, num_classes: int) -> TiedAdaMixer:
    backbone = make_backbone(cfg)
    neck = ChannelMapper(backbone.channels, cfg.dim, cfg.neck_kernel, cfg.neck_relu, cfg.gn_groups)
    stage = AdaMixerStage(
        num_classes, cfg.dim, cfg.num_heads, cfg.num_points, cfg.out_points, cfg.num_groups, cfg.ffn_dim,
        backbone.strides,
    )  # fmt: skip
    queries = InitialQueries(cfg.num_queries, cfg.dim)
    return TiedAdaMixer(backbone, neck, queries, stage, cfg.num_stages, num_select=cfg.num_select)


#: The table row: builder, optimiser recipe, not a DEQ, the demo's recipe, a named configuration.
TIED_ADAMIXER = Architecture(
    build_tied_adamixer,
    OptimizerRecipe(weight_decay=1e-4, decoder_lr_mult=1.0, decoder_wd_mult=1.0),
    deq=False,
    demo=DemoRecipe(lr=6e-4),
    configs={"tied_adamixer_tiny": ModelConfig(arch="tied_adamixer", **TINY, num_stages=3)},
)


def register() -> None:
    register_detector("tied_adamixer", TIED_ADAMIXER)
