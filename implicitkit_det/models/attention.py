"""Self-attention between the queries of one image, biased towards boxes that overlap."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import box_iof, position_encoding, xyzr_to_xyxy

__all__ = ["IoFSelfAttention"]


class IoFSelfAttention(nn.Module):
    """Multi-head self-attention over ``q + PE(xyzr)`` with a per-head IoF bias, residual and LayerNorm.

    With ``x = q + PE(xyzr)`` and, for head ``h``,

        A_h = softmax(Q_h K_h^T / sqrt(d) + tau_h log(IoF(b_i, b_j) + 1e-7))
        out = LN(x + W_o [A_1 V_1, ..., A_H V_H])

    where ``Q, K, V`` are linear maps of ``x``. The bias lets a head focus on queries whose boxes cover
    the same object (IoF 1 gives bias 0, disjoint boxes a large negative one); ``tau_h`` is learnt from
    ``U(0, 4)``. The boxes, their encoding and the IoF carry no gradient: only ``tau`` is trained through
    the bias. The residual adds ``x``, encoding included, as the reference decoders do.

    Arguments:
        dim: content channels.
        num_heads: attention heads.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8) -> None:
        super().__init__()
        if dim % num_heads or dim % 8:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads} and by 8")
        self.num_heads = num_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.tau = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.in_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.uniform_(self.tau, 0.0, 4.0)
        self.norm.reset_parameters()

    def forward(self, content: Tensor, xyzr: Tensor) -> Tensor:
        """``content`` [B, N, dim], ``xyzr`` [B, N, 4] (detached) -> [B, N, dim]."""
        b, n, dim = content.shape
        with torch.no_grad():
            boxes = xyzr_to_xyxy(xyzr)
            log_iof = (box_iof(boxes, boxes) + 1e-7).log()  # [B, N, N]
            pe = position_encoding(xyzr, dim // 4)
        bias = self.tau.view(1, -1, 1, 1) * log_iof[:, None]  # [B, H, N, N]
        x = content + pe
        q, k, v = self.in_proj(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.norm(x + self.out_proj(attended.transpose(1, 2).reshape(b, n, dim)))
