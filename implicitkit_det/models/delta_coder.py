"""Sparse R-CNN's box update: deltas relative to a box's centre and size (the ``DeltaXYWH`` coder).

A box ``b = (x0, y0, x1, y1)`` has centre ``(p_x, p_y)`` and size ``(p_w, p_h)``. Relative to it, a target
box ``g`` is encoded as

    d_x = (g_x - p_x) / (p_w s_x),      d_y = (g_y - p_y) / (p_h s_y),
    d_w = log(g_w / p_w) / s_w,          d_h = log(g_h / p_h) / s_h,

with per-coordinate scales ``s = (0.5, 0.5, 1, 1)`` (mmdetection's ``target_stds``; its ``target_means``
are 0). Decoding inverts this, ``g_x = p_x + s_x d_x p_w``, ``g_w = p_w exp(s_w d_w)``, after clamping
``s_w d_w`` and ``s_h d_h`` to ``|log(16 / 1000)|`` so that one step can grow or shrink a side by at most
62.5x. A centre step is measured in units of the box's own size, so the same prediction moves a small box
a little and a large box a lot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DELTA_STDS", "decode_deltas", "encode_deltas"]

#: Sparse R-CNN's scales ``(s_x, s_y, s_w, s_h)``.
DELTA_STDS = (0.5, 0.5, 1.0, 1.0)
_MAX_LOG_RATIO = abs(math.log(16 / 1000))


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor]:
    return 0.5 * (boxes[..., :2] + boxes[..., 2:]), boxes[..., 2:] - boxes[..., :2]


def encode_deltas(boxes: Tensor, targets: Tensor, stds: Sequence[float] = DELTA_STDS) -> Tensor:
    """The deltas that move ``boxes`` onto ``targets`` (see the module docstring).

    Arguments:
        boxes: ``[..., 4]`` xyxy with positive sides.
        targets: ``[..., 4]`` xyxy with positive sides, broadcastable against `boxes`.
        stds: ``(s_x, s_y, s_w, s_h)``.

    Returns:
        ``[..., 4]`` as ``(d_x, d_y, d_w, d_h)``.
    """
    p_xy, p_wh = _centre_size(boxes)
    g_xy, g_wh = _centre_size(targets)
    deltas = torch.cat([(g_xy - p_xy) / p_wh, torch.log(g_wh / p_wh)], dim=-1)
    return deltas / deltas.new_tensor(stds)


def decode_deltas(
    boxes: Tensor,
    deltas: Tensor,
    stds: Sequence[float] = DELTA_STDS,
    image_sizes: Tensor | None = None,
) -> Tensor:
    """Apply predicted ``deltas`` to ``boxes`` (see the module docstring).

    Arguments:
        boxes: ``[B, N, 4]`` (or any ``[..., 4]``) xyxy in pixels.
        deltas: same shape, as ``(d_x, d_y, d_w, d_h)``.
        stds: ``(s_x, s_y, s_w, s_h)``.
        image_sizes: ``[B, 2]`` real ``(h, w)``: clip the result to ``[0, w] x [0, h]``. Default None, no
            clipping, as Sparse R-CNN's configuration (``clip_border=False``).

    Returns:
        The moved boxes, ``[..., 4]`` xyxy.
    """
    p_xy, p_wh = _centre_size(boxes)
    scaled = deltas * deltas.new_tensor(stds)
    g_xy = p_xy + scaled[..., :2] * p_wh
    g_wh = p_wh * scaled[..., 2:].clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    out = torch.cat([g_xy - 0.5 * g_wh, g_xy + 0.5 * g_wh], dim=-1)
    if image_sizes is not None:
        h, w = image_sizes.to(out).unbind(-1)
        upper = torch.stack([w, h, w, h], dim=-1).view(-1, *([1] * (out.dim() - 2)), 4)
        out = torch.minimum(out.clamp_min(0), upper)
    return out
