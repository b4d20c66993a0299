"""Box parametrisations of the query decoders: ``xyzr`` <-> ``xyxy``, its sinusoidal encoding, and IoF.

A query's box is kept as ``(x, y, z, r)``: the centre in pixels, the log-scale and the log-aspect

    z = log2 sqrt(w h),      r = log2(h / w),      so   w = 2^(z - r/2),   h = 2^(z + r/2).

Scale and aspect live on a log axis, so an additive update changes a box multiplicatively and can never
make it negative, and ``z`` compares directly with ``log2`` of a feature map's stride.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert

__all__ = ["box_iof", "position_encoding", "xyxy_to_xyzr", "xyzr_size", "xyzr_to_xyxy"]


def xyxy_to_xyzr(boxes: Tensor, min_size: float = 1e-6) -> Tensor:
    """Corner boxes to ``(x, y, z, r)``.

        x = (x0 + x1) / 2,  y = (y0 + y1) / 2,  z = (log2 w + log2 h) / 2,  r = log2 h - log2 w

    Arguments:
        boxes: ``[..., 4]`` as ``(x0, y0, x1, y1)`` with ``x1 >= x0`` and ``y1 >= y0``.
        min_size: sides are clamped to at least this before the logarithm, so a degenerate box stays finite.

    Returns:
        ``[..., 4]`` as ``(x, y, z, r)``.
    """
    cxcywh = box_convert(boxes, "xyxy", "cxcywh")
    log_wh = cxcywh[..., 2:].clamp_min(min_size).log2()
    z = 0.5 * (log_wh[..., :1] + log_wh[..., 1:])
    r = log_wh[..., 1:] - log_wh[..., :1]
    return torch.cat([cxcywh[..., :2], z, r], dim=-1)


def xyzr_size(xyzr: Tensor) -> Tensor:
    """The width and height of ``(x, y, z, r)`` boxes: ``w = 2^(z - r/2)``, ``h = 2^(z + r/2)``, ``[..., 2]``."""
    z, half_r = xyzr[..., 2:3], 0.5 * xyzr[..., 3:4]
    return torch.exp2(torch.cat([z - half_r, z + half_r], dim=-1))


def xyzr_to_xyxy(xyzr: Tensor) -> Tensor:
    """``(x, y, z, r)`` to corner boxes ``(x -+ w/2, y -+ h/2)`` (:func:`xyzr_size`).

    Arguments:
        xyzr: ``[..., 4]``.

    Returns:
        ``[..., 4]`` as ``(x0, y0, x1, y1)``.
    """
    # The layers call this at every refinement step: few operator calls, the same numbers as box_convert's
    # cx -+ w / 2.
    centre, half = xyzr[..., :2], 0.5 * xyzr_size(xyzr)
    return torch.cat([centre - half, centre + half], dim=-1)


def position_encoding(xyzr: Tensor, num_feats: int = 64, temperature: float = 10000.0) -> Tensor:
    """Sinusoidal encoding of ``(x / 1000, y / 1000, z, r)`` with ``num_feats`` features per coordinate.

    For each coordinate ``v`` and feature ``k = 0 .. num_feats - 1``, with ``t_k = T^(2 floor(k/2) / num_feats)``:

        PE_k(v) = sin(v / t_k) for even k,   cos(v / t_k) for odd k

    The centre is divided by 1000 so that pixel positions fall in the range where the lowest frequencies
    still vary; ``z`` and ``r`` are already of order 1.

    Arguments:
        xyzr: ``[..., 4]`` boxes.
        num_feats: features per coordinate (the content dimension over 4); even.
        temperature: ``T``.

    Returns:
        ``[..., 4 * num_feats]``: the encodings of x, y, z, r one after another.
    """
    if num_feats % 2:
        raise ValueError(f"num_feats must be even, got {num_feats}")
    scale = xyzr.new_tensor([1000.0, 1000.0, 1.0, 1.0])
    # Features 2j and 2j + 1 share the period t_2j = T^(2j / num_feats): one angle for both, its sin and cos.
    even = torch.arange(0, num_feats, 2, device=xyzr.device, dtype=xyzr.dtype)
    angles = (xyzr / scale)[..., None] / temperature ** (even / num_feats)  # [..., 4, num_feats / 2]
    features = torch.stack([angles.sin(), angles.cos()], dim=-1)
    return features.flatten(-3)  # (sin, cos) pairs interleaved, then the four coordinates


def box_iof(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Intersection over the first box's area ("intersection over foreground"), batched.

        IoF(a, b) = |a ∩ b| / |a|

    Unlike IoU it is asymmetric: a small box lying inside a large one has IoF 1 towards it, while the large
    box has a small IoF towards the small one.

    Arguments:
        boxes1: ``[..., N, 4]`` xyxy.
        boxes2: ``[..., M, 4]`` xyxy.

    Returns:
        ``[..., N, M]`` in ``[0, 1]``.
    """
    first, second = boxes1[..., :, None, :], boxes2[..., None, :, :]
    top_left = torch.maximum(first[..., :2], second[..., :2])
    bottom_right = torch.minimum(first[..., 2:], second[..., 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    area1 = (first[..., 2:] - first[..., :2]).prod(dim=-1)
    return inter / area1.clamp_min(torch.finfo(inter.dtype).tiny)
