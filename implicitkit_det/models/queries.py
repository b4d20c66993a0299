"""The decoders' state (a content vector and a box per query) and its learned starting point."""

from __future__ import annotations

from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import xyxy_to_xyzr

__all__ = ["InitialQueries", "QueryState"]


class QueryState(TypedDict):
    """What one decoder layer maps to the next: per image and query, a content vector and a box.

    - ``content``: ``[B, N, dim]``.
    - ``xyzr``: ``[B, N, 4]``, the box as centre (pixels), log-scale and log-aspect (see :mod:`.boxes`).

    A plain dict at run time, so :mod:`implicitkit` treats it as a structured fixed-point state.
    """

    content: Tensor
    xyzr: Tensor


class InitialQueries(nn.Module):
    """``N`` learned content vectors, each starting on the whole image.

        content_i = LN(e_i)   (LayerNorm without affine of a learned embedding e_i)
        box_i     = (0, 0, w, h)   the image's real (unpadded) extent, fixed

    Every query starts equal in position, so only its content tells it apart; the decoder's layers move the
    boxes.

    Arguments:
        num_queries: ``N``.
        dim: content channels.
    """

    def __init__(self, num_queries: int = 100, dim: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_queries, dim)

    def forward(self, image_sizes: Tensor) -> QueryState:
        """The starting state for images of real sizes ``image_sizes`` [B, 2] as ``(h, w)``."""
        content = F.layer_norm(self.embedding.weight, self.embedding.weight.shape[-1:])
        batch, n = image_sizes.shape[0], content.shape[0]
        h, w = image_sizes.to(content).unbind(-1)
        zeros = torch.zeros_like(h)
        boxes = torch.stack([zeros, zeros, w, h], dim=-1)[:, None].expand(batch, n, 4)
        return {"content": content.expand(batch, -1, -1), "xyzr": xyxy_to_xyzr(boxes)}
