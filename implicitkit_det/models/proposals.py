"""Sparse R-CNN's state (a feature and a corner box per proposal) and its learned starting point."""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["LearnedProposals", "ProposalState"]


class ProposalState(TypedDict):
    """What one Sparse R-CNN stage maps to the next: per image and proposal, a feature and a box.

    - ``content``: ``[B, N, dim]``, the proposal feature.
    - ``xyxy``: ``[B, N, 4]``, the box's corners in pixels of the input image.

    A plain dict at run time, so :mod:`implicitkit` treats it as a structured fixed-point state.
    """

    content: Tensor
    xyxy: Tensor


class LearnedProposals(nn.Module):
    """``N`` learned proposal boxes and features, both trained (mmdetection's ``EmbeddingRPNHead``).

        box_i     = cxcywh_to_xyxy(e_i) * (w, h, w, h)     e_i = (0.5, 0.5, 1, 1) at initialisation
        content_i = f_i                                    f_i ~ N(0, 1), PyTorch's ``Embedding`` default

    The boxes are normalised by each image's real (unpadded) size, so at first every proposal covers the
    whole image; training moves them to where objects tend to be. Unlike DEQDet's queries, the content has
    no LayerNorm.

    Arguments:
        num_proposals: ``N``.
        dim: channels of the proposal features.
    """

    def __init__(self, num_proposals: int = 100, dim: int = 256) -> None:
        super().__init__()
        self.boxes = nn.Embedding(num_proposals, 4)
        self.embedding = nn.Embedding(num_proposals, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        self.boxes.weight[:, :2] = 0.5
        self.boxes.weight[:, 2:] = 1.0

    def forward(self, image_sizes: Tensor) -> ProposalState:
        """The starting state for images of real sizes ``image_sizes`` [B, 2] as ``(h, w)``."""
        batch = image_sizes.shape[0]
        h, w = image_sizes.to(self.boxes.weight).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None]  # [B, 1, 4]
        xyxy = box_convert(self.boxes.weight, "cxcywh", "xyxy")[None] * scale
        return {"content": self.embedding.weight.expand(batch, -1, -1), "xyxy": xyxy}
