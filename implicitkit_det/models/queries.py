"""The decoders' state (a content vector and a box per query) and its learned starting point."""

from __future__ import annotations

import math
import typing
import warnings
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .boxes import xyxy_to_xyzr

__all__ = ["InitialQueries", "QueryBoxes", "QueryState", "grid_cells"]


class QueryState(TypedDict):
    """What one decoder layer maps to the next: per image and query, a content vector and a box.

    - ``content``: ``[B, N, dim]``.
    - ``xyzr``: ``[B, N, 4]``, the box as centre (pixels), log-scale and log-aspect (see :mod:`.boxes`).

    A plain dict at run time, so :mod:`implicitkit` treats it as a structured fixed-point state.
    """

    content: Tensor
    xyzr: Tensor


QueryBoxes = Literal["image", "grid"]


def grid_cells(num_queries: int) -> Tensor:
    """``[N, 4]`` boxes ``(x0, y0, x1, y1)`` in image fractions: the cells of a ``rows x cols`` grid, row by
    row, with ``rows`` the divisor of ``N`` closest to ``sqrt(N)`` from below (10 queries: 2 x 5)."""
    rows = max(r for r in range(1, math.isqrt(num_queries) + 1) if num_queries % r == 0)
    cols = num_queries // rows
    index = torch.arange(num_queries)
    row, col = index // cols, index % cols
    return torch.stack([col / cols, row / rows, (col + 1) / cols, (row + 1) / rows], dim=-1)


class InitialQueries(nn.Module):
    """``N`` learned content vectors, each with a fixed starting box.

        content_i = LN(e_i)   (LayerNorm without affine of a learned embedding e_i)
        box_i     = (0, 0, w, h)   the image's real (unpadded) extent: ``boxes="image"``, the published design
        box_i     = cell i of a grid over (0, 0, w, h)   ``boxes="grid"`` (:func:`grid_cells`)

    With ``"image"`` every query starts equal in position, so only its content tells it apart; with
    ``"grid"`` each starts on its own part of the image (an anchor, as in Anchor DETR), which tells the
    queries apart from the first step. Either way the decoder's layers move the boxes. The kind is saved in
    the state dict (``on_grid``, a one-byte buffer): loading weights saved with the other kind warns, and
    older state dicts without it load quietly.

    Arguments:
        num_queries: ``N``.
        dim: content channels.
        boxes: ``"image"`` or ``"grid"``.
    """

    def __init__(self, num_queries: int = 100, dim: int = 256, boxes: QueryBoxes = "image") -> None:
        super().__init__()
        if boxes not in typing.get_args(QueryBoxes):
            raise ValueError(f"boxes must be 'image' or 'grid', got {boxes!r}")
        self.embedding = nn.Embedding(num_queries, dim)
        whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(num_queries, 1)
        self.boxes = boxes
        # The start boxes stay out of the state dict (checkpoints of either kind load into the other), in
        # memory of their own: DDP broadcasts buffers in place.
        self.register_buffer(
            "fractions", grid_cells(num_queries) if boxes == "grid" else whole, persistent=False
        )
        # Their kind is saved (a one-byte tensor, as state dicts hold), so that loading the other kind warns.
        self.register_buffer("on_grid", torch.tensor(boxes == "grid", dtype=torch.uint8))
        self.register_load_state_dict_pre_hook(_warn_of_the_other_kind)

    def forward(self, image_sizes: Tensor) -> QueryState:
        """The starting state for images of real sizes ``image_sizes`` [B, 2] as ``(h, w)``."""
        content = F.layer_norm(self.embedding.weight, self.embedding.weight.shape[-1:])
        batch = image_sizes.shape[0]
        h, w = image_sizes.to(content).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None]  # [B, 1, 4]
        boxes = self.fractions * scale
        return {"content": content.expand(batch, -1, -1), "xyzr": xyxy_to_xyzr(boxes)}


def _warn_of_the_other_kind(module: InitialQueries, state_dict: dict, prefix: str, *args: object) -> None:
    """Warn when `state_dict` was saved with the other kind of start boxes; keep the model's own kind either
    way (a state dict saved before the kind was recorded has none: it loads quietly)."""
    saved = state_dict.get(f"{prefix}on_grid")
    if saved is not None and bool(saved) != bool(module.on_grid):
        trained = "grid" if bool(saved) else "image"
        warnings.warn(
            f"loading query embeddings trained with query_boxes={trained!r} into a model with "
            f"query_boxes={module.boxes!r}: the queries now start from other boxes than in training, which "
            f"changes every detection; build the model with query_boxes={trained!r} to reproduce it",
            stacklevel=2,
        )
    state_dict[f"{prefix}on_grid"] = module.on_grid.clone()
