"""Multi-level RoIAlign: read a fixed ``S x S`` grid of features for every box from the level its size picks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["MultiLevelRoIAlign", "roi_levels"]


def roi_levels(boxes: Tensor, num_levels: int = 4, canonical_scale: float = 56.0) -> Tensor:
    """The pyramid level each box reads from, by its scale ``s = sqrt(w h)`` (mmdetection's rule).

        level = clamp(floor(log2(s / canonical_scale + 1e-6)), 0, num_levels - 1)

    With the finest level at stride 4 and ``canonical_scale`` 56, boxes up to 112 px read stride 4,
    112-224 px stride 8, 224-448 px stride 16 and larger ones stride 32.

    Arguments:
        boxes: ``[..., 4]`` xyxy in pixels.
        num_levels: levels of the pyramid.
        canonical_scale: the scale at which a box moves from level 0 to level 1 is twice this.

    Returns:
        ``[...]`` int64 levels in ``0 .. num_levels - 1``.
    """
    scale = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp_min(0).sqrt()
    levels = torch.floor(torch.log2(scale / canonical_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign on the level :func:`roi_levels` picks: ``[B, N, 4]`` boxes -> ``[B N, C, S, S]`` features.

    Each box is read with ``torchvision.ops.roi_align`` (``spatial_scale = 1 / stride``, half-pixel
    ``aligned=True``, ``sampling_ratio`` bilinear samples per bin and axis, averaged) on its own level.

    ``torchvision.ops.MultiScaleRoIAlign`` is not used because it differs in three ways: its
    ``LevelMapper`` writes the rule as ``floor(4 + log2(s / 224) + 1e-6)`` over the levels' ``log2``
    strides (the same level as here for strides 4..32, but with the epsilon outside the logarithm, so boxes
    at exactly a level boundary can fall differently); it infers the strides from the feature and padded
    image shapes; and it calls ``roi_align`` with ``aligned=False`` (no half-pixel offset), unlike
    mmdetection's ``RoIAlign``.

    Arguments:
        strides: of the feature levels, finest first.
        output_size: ``S``.
        sampling_ratio: samples per bin and axis.
        canonical_scale: of :func:`roi_levels`.
    """

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16, 32),
        output_size: int = 7,
        sampling_ratio: int = 2,
        canonical_scale: float = 56.0,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.output_size, self.sampling_ratio, self.canonical_scale = (
            output_size,
            sampling_ratio,
            canonical_scale,
        )

    def forward(self, features: Sequence[Tensor], boxes: Tensor) -> Tensor:
        """``features`` ``[B, C, H_j, W_j]`` per level and ``boxes`` ``[B, N, 4]`` xyxy pixels -> ``[B N, C, S, S]``.

        Row ``b N + i`` holds box ``i`` of image ``b``. ``boxes`` may stack ``r`` blocks of the ``B`` images'
        boxes (``[r B, N, 4]``, row ``j B + b`` on image ``b``), read from the ``B`` maps.
        """
        if len(features) != len(self.strides):
            raise ValueError(f"{len(features)} feature levels but {len(self.strides)} strides {self.strides}")
        batch, n = boxes.shape[:2]
        images = features[0].shape[0]
        if batch % images:
            raise ValueError(
                f"{batch} rows of boxes for {images} images: rows must be a multiple of the images"
            )
        flat = boxes.reshape(-1, 4).detach()  # roi_align has no gradient for the boxes
        index = (torch.arange(batch, device=boxes.device) % images).to(flat.dtype).repeat_interleave(n)
        rois = torch.cat([index[:, None], flat], dim=1).to(features[0].dtype)
        levels = roi_levels(flat, len(self.strides), self.canonical_scale)
        out = features[0].new_zeros(batch * n, features[0].shape[1], self.output_size, self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            rows = torch.nonzero(levels == level).squeeze(1)
            if rows.numel():
                pooled = roi_align(
                    feature,
                    rois[rows],
                    self.output_size,
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )
                out = out.index_copy(0, rows, pooled.to(out.dtype))
            elif feature.requires_grad:
                # No box reads this level: a zero that depends on it, so that the layers making it still get
                # a (zero) gradient, as DistributedDataParallel expects of every parameter in every step.
                out = out + 0.0 * feature.sum()
        return out

    def extra_repr(self) -> str:
        return (
            f"strides={self.strides}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, "
            f"canonical_scale={self.canonical_scale}"
        )
