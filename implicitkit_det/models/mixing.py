"""Adaptive mixing: per-query channel and point mixing matrices generated from the query itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AdaptiveMixing"]


class AdaptiveMixing(nn.Module):
    """Mix each query's sampled features with matrices the query generates, then add them to it.

    For one query and group, with ``X`` the ``[P, c]`` sampled features (``c = C / G`` channels), a linear
    map of the query content gives a channel matrix ``M`` ``[c, c]`` and a point matrix ``S``
    ``[P_out, P]``, and

        X' = ReLU(LN(X M)),    X'' = ReLU(LN(S X'))       (LN over the whole matrix, no affine)
        q  <- LN(q + W_out flatten_g(X''))

    ``M`` mixes channels at every point, ``S`` mixes the points into ``P_out`` new ones: a dynamic,
    query-specific MLP over the sampled set. The generator's weight starts at 0, so at first ``M`` and
    ``S`` are its (random) bias, the same for every query; training makes them depend on the query.

    Arguments:
        dim: query content channels.
        feature_dim: ``C``, channels of the sampled features (all groups).
        num_points: ``P``, sampled points per group.
        out_points: ``P_out``.
        num_groups: ``G``.
    """

    def __init__(
        self,
        dim: int = 256,
        feature_dim: int = 256,
        num_points: int = 32,
        out_points: int = 128,
        num_groups: int = 4,
    ) -> None:
        super().__init__()
        if feature_dim % num_groups:
            raise ValueError(f"feature_dim {feature_dim} must be divisible by num_groups {num_groups}")
        self.num_groups, self.num_points, self.out_points = num_groups, num_points, out_points
        self.group_dim = feature_dim // num_groups
        self.channel_params = self.group_dim**2
        self.point_params = out_points * num_points
        self.generator = nn.Linear(dim, num_groups * (self.channel_params + self.point_params))
        self.out_proj = nn.Linear(num_groups * out_points * self.group_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.generator.reset_parameters()  # keeps the default bias: the matrices' starting values
        nn.init.zeros_(self.generator.weight)
        self.out_proj.reset_parameters()
        nn.init.xavier_uniform_(self.out_proj.weight)
        self.norm.reset_parameters()

    def forward(self, sampled: Tensor, content: Tensor) -> Tensor:
        """``sampled`` [B, N, G, P, c] and ``content`` [B, N, dim] -> updated content [B, N, dim]."""
        b, n, g, p, c = sampled.shape
        params = self.generator(content).view(b, n, g, -1)
        channel_mix, point_mix = params.split([self.channel_params, self.point_params], dim=-1)
        x = sampled @ channel_mix.view(b, n, g, c, c)
        x = F.relu(F.layer_norm(x, x.shape[-2:]))
        x = point_mix.view(b, n, g, self.out_points, p) @ x
        x = F.relu(F.layer_norm(x, x.shape[-2:]))
        return self.norm(content + self.out_proj(x.flatten(2)))
