"""Sparse R-CNN's dynamic instance interaction: each proposal filters its own RoI features."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DynamicInteraction"]


class DynamicInteraction(nn.Module):
    """A two-layer per-point MLP over a proposal's RoI features whose weights the proposal generates.

    For one proposal with content ``q`` and RoI features ``X`` (``[S^2, C]``, one row per grid point), a
    linear map of ``q`` gives ``W_1`` (``[C, c]``) and ``W_2`` (``[c, C]``), and

        X' = ReLU(LN_c(X W_1)),    X'' = ReLU(LN_C(X' W_2))      (LN per point, with affine)
        out = ReLU(LN_C(W_out flatten(X'')))                        (flatten: S^2 C values)

    mmdetection's ``DynamicConv``: a "1x1 convolution" whose filters depend on the proposal, so each
    proposal reads the image in its own way. The caller adds ``out`` to ``q`` (residual and LayerNorm).

    **Parameters** (``C`` 256, ``c`` 64, ``S`` 7): generator ``Linear(256, 2 * 256 * 64)`` 8,421,376;
    LNs 128 + 512 + 512; ``Linear(12544, 256)`` 3,211,520; 11,634,048 in all.

    Arguments:
        dim: ``C``, channels of the proposal content and of the RoI features.
        hidden_dim: ``c``.
        roi_size: ``S``.
    """

    def __init__(self, dim: int = 256, hidden_dim: int = 64, roi_size: int = 7) -> None:
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.generator = nn.Linear(dim, 2 * dim * hidden_dim)
        self.norm_in = nn.LayerNorm(hidden_dim)
        self.norm_out = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(roi_size * roi_size * dim, dim)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, content: Tensor, roi_features: Tensor) -> Tensor:
        """``content`` ``[K, C]`` and ``roi_features`` ``[K, C, S, S]`` (one row per proposal) -> ``[K, C]``."""
        k = content.shape[0]
        w_in, w_out = self.generator(content).split(self.dim * self.hidden_dim, dim=-1)
        x = roi_features.flatten(2).transpose(1, 2)  # [K, S^2, C]
        x = F.relu(self.norm_in(x @ w_in.view(k, self.dim, self.hidden_dim)))
        x = F.relu(self.norm_out(x @ w_out.view(k, self.hidden_dim, self.dim)))
        return F.relu(self.out_norm(self.out_proj(x.flatten(1))))
