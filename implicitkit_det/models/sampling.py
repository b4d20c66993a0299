"""Adaptive 3D sampling: each query reads features at points it chooses, in space and across pyramid levels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import xyzr_size

__all__ = ["AdaptiveSampling3D", "sample_pyramid"]


def sample_pyramid(features: Sequence[Tensor], points: Tensor, strides: Sequence[int]) -> Tensor:
    """Bilinear samples of a feature pyramid at 3D points ``(x, y, z)``, blended across levels by ``z``.

    Level ``j`` (stride ``s_j``) is sampled at ``(x, y)`` (pixels of the padded image) with zero padding
    outside the map, and the levels are mixed with the weights

        w_j = softmax_j(-(z - log2 s_j)^2 / 2)

    so a point of scale ``z = log2(size)`` reads mostly the level whose stride matches that size. Channels
    are split into ``G`` groups; group ``g`` is sampled at its own points.

    Arguments:
        features: levels ``[B, C, H_j, W_j]``, with ``H_j s_j`` and ``W_j s_j`` the padded image size.
        points: ``[B, N, G, P, 3]``: ``G`` groups of ``P`` points per query, as (x, y) pixels and ``z``; or
            ``[r B, N, G, P, 3]``, ``r`` blocks of the ``B`` images' queries stacked (row ``j B + i`` on
            image ``i``), sampled from the ``B`` maps as ``r N`` queries per image, without copying them.
        strides: ``s_j`` of each level.

    Returns:
        ``[B, N, G, P, C / G]`` (``[r B, ...]`` for stacked points).
    """
    rows, queries, groups, p, _ = points.shape
    b = features[0].shape[0]
    if rows % b:
        raise ValueError(f"{rows} rows of points for {b} images: rows must be a multiple of the images")
    blocks = rows // b
    n = blocks * queries  # the queries each image's maps are read for
    if blocks > 1:  # each image's blocks side by side: [r B, N, ...] -> [B, r N, ...]
        points = points.view(blocks, b, queries, groups, p, 3).transpose(0, 1).reshape(b, n, groups, p, 3)
    xy, z = points[..., :2], points[..., 2]
    log_strides = torch.tensor([math.log2(s) for s in strides], dtype=z.dtype, device=z.device)
    # Levels first: PyTorch's CPU softmax over a last dim of 4 is ~10x slower than over the first.
    level_weights = torch.softmax(
        -0.5 * (z - log_strides.view(-1, 1, 1, 1, 1)) ** 2, dim=0
    )  # [L, B, N, G, P]
    # Every level's grid in one expression (the decoder samples at each of its many steps, so operator
    # calls count): grid_sample wants [-1, 1] over the map's outer edges (align_corners=False), i.e.
    # 2 x / (W s) - 1, for each level's padded extent (W s, H s).
    extents = points.new_tensor(
        [[f.shape[-1] * s, f.shape[-2] * s] for f, s in zip(features, strides, strict=True)]
    )
    grids = (2.0 * xy.transpose(1, 2)[None]) / extents[:, None, None, None, None] - 1.0  # [L, B, G, N, P, 2]
    grids = grids.reshape(len(strides), b * groups, n, p, 2)
    out = None
    for feature, grid, weight in zip(features, grids, level_weights[..., None].unbind(0), strict=True):
        _, channels, h, w = feature.shape
        value = feature.reshape(b * groups, channels // groups, h, w)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weighted = sampled.view(b, groups, -1, n, p).permute(0, 3, 1, 4, 2) * weight  # [B, N, G, P, C/G]
        out = weighted if out is None else out + weighted
    assert out is not None, "an empty feature pyramid"
    if blocks > 1:
        out = (
            out.view(b, blocks, queries, groups, p, -1).transpose(0, 1).reshape(rows, queries, groups, p, -1)
        )
    return out


class AdaptiveSampling3D(nn.Module):
    """Per query, ``G x P`` sampling points placed relative to its box, then :func:`sample_pyramid`.

    A linear map of the content gives per point ``(dx, dy, dz)`` and the point is

        (x + dx w,  y + dy h,  z + dz)

    for the query's box ``(x, y, z, r)`` of width ``w`` and height ``h``. The map starts at weight 0, so at
    first every query samples the same pattern relative to its box: a regular ``sqrt(P) x sqrt(P)`` grid of
    cell centres in ``[-0.5, 0.5]^2`` when ``P`` is a square (else uniform in that square), one level below
    the box's own scale (``dz = -1``), i.e. on a finer map.

    Arguments:
        dim: content channels.
        num_points: ``P``, points per group.
        num_groups: ``G``, channel groups of the features.
        strides: of the pyramid levels.
    """

    def __init__(
        self,
        dim: int = 256,
        num_points: int = 32,
        num_groups: int = 4,
        strides: Sequence[int] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        self.num_points, self.num_groups, self.strides = num_points, num_groups, tuple(strides)
        self.offsets = nn.Linear(dim, num_groups * num_points * 3)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offsets.weight)
        bias = self.offsets.bias.view(self.num_groups, self.num_points, 3)
        side = math.isqrt(self.num_points)
        if side * side == self.num_points:
            centres = (torch.arange(side, dtype=bias.dtype) + 0.5) / side - 0.5
            dy, dx = torch.meshgrid(centres, centres, indexing="ij")
            bias[..., 0] = dx.flatten()
            bias[..., 1] = dy.flatten()
        else:
            nn.init.uniform_(bias[..., :2], -0.5, 0.5)
        bias[..., 2] = -1.0

    def points(self, content: Tensor, xyzr: Tensor) -> Tensor:
        """The sampling points ``[B, N, G, P, 3]`` of ``content`` [B, N, dim] around ``xyzr`` [B, N, 4]."""
        b, n, _ = content.shape
        offsets = self.offsets(content).view(b, n, self.num_groups, self.num_points, 3)
        # (x, y, z) + (dx, dy, dz) * (w, h, 1), as one broadcast product and sum: few operator calls.
        scale = torch.cat([xyzr_size(xyzr), torch.ones_like(xyzr[..., :1])], dim=-1)
        return xyzr[:, :, None, None, :3] + offsets * scale[:, :, None, None, :]

    def forward(self, content: Tensor, xyzr: Tensor, features: Sequence[Tensor]) -> Tensor:
        """Sampled features ``[B, N, G, P, C / G]``."""
        return sample_pyramid(features, self.points(content, xyzr), self.strides)
