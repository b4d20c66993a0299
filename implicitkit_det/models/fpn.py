"""Sparse R-CNN's neck: a feature pyramid network on the backbone's four stages (P2..P5, no extra level)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork

from .neck import check_groups

__all__ = ["FPN"]


class FPN(nn.Module):
    """``torchvision.ops.FeaturePyramidNetwork`` on lists of levels, initialised as mmdetection's ``FPN``.

    With lateral ``1 x 1`` convolutions ``L_j`` and output ``3 x 3`` convolutions ``O_j`` (both with bias)
    and nearest-neighbour upsampling ``up`` to the next finer level's size, for levels ``j = 2 .. 5``:

        M_5 = L_5(C_5),    M_j = L_j(C_j) + up(M_{j+1})  (j = 4, 3, 2),    P_j = O_j(M_j)

    No activation, no extra coarser level (mmdetection's ``num_outs=4`` on four inputs) and, by default, no
    normalisation. The convolutions are Xavier-uniform with zero bias (torchvision's own default is
    Kaiming-uniform).

    With `norm_groups`, every convolution is followed by a ``GroupNorm`` and has no bias (mmdetection's
    ``FPN(norm_cfg=dict(type="GN"))``): each output level is normalised per image, so the features cannot
    drift to an offset shared by all images, which is how Sparse R-CNN collapses at a high learning rate
    (docs/sparse_rcnn.md).

    **Parameters** for ResNet-50 (256, 512, 1024, 2048) to 256 channels: laterals 984,064, outputs
    2,360,320; 3,344,384 in all.

    Arguments:
        in_channels: channels of each backbone level, finest first.
        out_channels: channels of every output level.
        norm_groups: None (the published neck), or the groups of a ``GroupNorm`` after every convolution.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int = 256, norm_groups: int | None = None
    ) -> None:
        super().__init__()
        if norm_groups is not None:
            check_groups(norm_groups, out_channels)
        norm = None if norm_groups is None else partial(nn.GroupNorm, norm_groups)
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, norm_layer=norm)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Backbone levels ``[B, in_channels_j, H_j, W_j]`` -> ``[B, out_channels, H_j, W_j]``."""
        levels = OrderedDict((str(j), x) for j, x in enumerate(features))
        return list(self.fpn(levels).values())
