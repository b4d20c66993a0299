"""Refinement-aware perturbation (RAP): disturb the query contents and boxes on DEQDet's solver path.

Both parts follow :mod:`implicitkit`'s perturbation protocol ``(state, step) -> state``: the solver calls
them before each no-grad step in training, and the path continues from the disturbed state. The content
part is :class:`implicitkit.GaussianPerturbation`; the box part needs the box parametrisation and lives here:
:class:`BoxPerturbation` for DEQDet's ``xyzr`` boxes, :class:`CornerPerturbation` for Sparse R-CNN's
``xyxy`` ones.
"""

from __future__ import annotations

import torch

from implicitkit import GaussianPerturbation

from .boxes import xyxy_to_xyzr, xyzr_to_xyxy
from .proposals import ProposalState
from .queries import QueryState

__all__ = ["RAP", "BoxPerturbation", "CornerPerturbation", "SparseRCNNRAP"]


def _corner_noise(
    boxes: torch.Tensor, prob: float, pixels: float, generator: torch.Generator | None
) -> torch.Tensor | None:
    """``pixels * eps`` shaped like ``boxes`` with probability ``prob`` (one draw), else None."""
    device = generator.device if generator is not None else boxes.device
    if prob == 0.0 or not bool(torch.rand((), generator=generator, device=device) < prob):
        return None
    eps = torch.randn(boxes.shape, generator=generator, device=device, dtype=boxes.dtype)
    return pixels * eps.to(boxes.device)


def _sorted_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Swap crossed corners back: ``(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))``."""
    lo, hi = boxes[..., :2], boxes[..., 2:]
    return torch.cat([torch.minimum(lo, hi), torch.maximum(lo, hi)], dim=-1)


class BoxPerturbation:
    """With probability ``prob`` per step, move every box corner by Gaussian noise of ``pixels`` pixels.

        (x0, y0, x1, y1) <- (x0, y0, x1, y1) + pixels * eps,   eps ~ N(0, I),   then re-encoded as xyzr

    One Bernoulli draw per step decides for the whole batch; ``eps`` is drawn per corner coordinate.

    Corners that cross (``x1 < x0`` or ``y1 < y0``) are left as they are by default, as in the official
    DEQDet code: :func:`~.boxes.xyxy_to_xyzr` then clamps the negative side to ``min_size``, so the box
    collapses to a sliver (every other query's IoF towards it is 0 in the next step's self-attention, and
    its sampling points lie on one line) until the refinement regrows it. With ``sort_corners=True`` the corners
    are swapped back first, so the box keeps side lengths ``|x1 - x0|``, ``|y1 - y0|`` (what Sparse
    R-CNN's :class:`CornerPerturbation` always does).

    Arguments:
        prob: probability that a step is perturbed.
        pixels: noise scale in pixels.
        generator: source of randomness for reproducible paths; default the global generator.
        sort_corners: swap crossed corners back before re-encoding.
    """

    def __init__(
        self,
        prob: float = 0.2,
        pixels: float = 25.0,
        generator: torch.Generator | None = None,
        sort_corners: bool = False,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.prob, self.pixels, self.generator = float(prob), float(pixels), generator
        self.sort_corners = bool(sort_corners)

    def __call__(self, state: QueryState, step: int) -> QueryState:
        xyzr = state["xyzr"]
        noise = _corner_noise(xyzr, self.prob, self.pixels, self.generator)
        if noise is None:
            return state
        corners = xyzr_to_xyxy(xyzr) + noise
        if self.sort_corners:
            corners = _sorted_corners(corners)
        return {**state, "xyzr": xyxy_to_xyzr(corners)}

    def __repr__(self) -> str:
        return f"BoxPerturbation(prob={self.prob}, pixels={self.pixels}, sort_corners={self.sort_corners})"


class _ContentAndBoxNoise:
    """Two perturbations of one state, ``content`` and ``box``, sharing one generator."""

    content: GaussianPerturbation
    box: BoxPerturbation | CornerPerturbation

    @property
    def generator(self) -> torch.Generator | None:
        return self.box.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self.content.generator = self.box.generator = generator


class RAP(_ContentAndBoxNoise):
    """DEQDet's refinement-aware perturbation: the content part, then the box part, each drawn independently.

        q <- 0.9 q + 0.1 ||q|| eps        with probability 0.2 per step   (norm per query, over channels)
        b <- b + 25 eps  (pixels, corners) with probability 0.2 per step

    Training the refinement layer on states it did not produce itself teaches it to correct errors rather
    than to follow its own path, and the supervised branches see more varied inputs.

    Arguments:
        content_prob, content_scale: of the :class:`implicitkit.GaussianPerturbation` on ``content``.
        box_prob, box_pixels, sort_corners: of the :class:`BoxPerturbation` (crossed corners are left
            unsorted by default, as in the official code).
        generator: shared by both parts, for reproducible paths.
    """

    def __init__(
        self,
        content_prob: float = 0.2,
        content_scale: float = 0.1,
        box_prob: float = 0.2,
        box_pixels: float = 25.0,
        generator: torch.Generator | None = None,
        sort_corners: bool = False,
    ) -> None:
        self.content = GaussianPerturbation(
            content_prob, content_scale, leaves="content", generator=generator
        )
        self.box = BoxPerturbation(box_prob, box_pixels, generator=generator, sort_corners=sort_corners)

    def __call__(self, state: QueryState, step: int) -> QueryState:
        return self.box(self.content(state, step), step)

    def __repr__(self) -> str:
        return f"RAP({self.content!r}, {self.box!r})"


class CornerPerturbation:
    """With probability ``prob`` per step, move every corner of the ``xyxy`` boxes by ``pixels`` of noise.

        (x0, y0, x1, y1) <- sort((x0, y0, x1, y1) + pixels * eps),   eps ~ N(0, I)

    where ``sort`` swaps crossed corners back (``x0 <= x1``, ``y0 <= y1``), so the state stays a valid
    corner box for RoIAlign and the delta coder. :class:`BoxPerturbation` on corner boxes: one Bernoulli
    draw per step for the whole batch, ``eps`` per corner coordinate, the same random draws in the same
    order.

    Arguments:
        prob: probability that a step is perturbed.
        pixels: noise scale in pixels.
        generator: source of randomness for reproducible paths; default the global generator.
    """

    def __init__(
        self, prob: float = 0.2, pixels: float = 25.0, generator: torch.Generator | None = None
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}")
        self.prob, self.pixels, self.generator = float(prob), float(pixels), generator

    def __call__(self, state: ProposalState, step: int) -> ProposalState:
        noise = _corner_noise(state["xyxy"], self.prob, self.pixels, self.generator)
        if noise is None:
            return state
        return {**state, "xyxy": _sorted_corners(state["xyxy"] + noise)}

    def __repr__(self) -> str:
        return f"CornerPerturbation(prob={self.prob}, pixels={self.pixels})"


class SparseRCNNRAP(_ContentAndBoxNoise):
    """RAP for DEQ Sparse R-CNN's ``{content, xyxy}`` state: the box part first, then the content part.

        b <- sort(b + 25 eps)              (pixels, corners) with probability 0.2 per step
        q <- 0.9 q + 0.1 ||q|| eps         with probability 0.2 per step   (norm per proposal)

    The order (box, then content) and the re-sorted corners follow the official DEQ Sparse R-CNN head;
    DEQDet's :class:`RAP` perturbs the content first.

    Arguments:
        content_prob, content_scale: of the :class:`implicitkit.GaussianPerturbation` on ``content``.
        box_prob, box_pixels: of the :class:`CornerPerturbation`.
        generator: shared by both parts, for reproducible paths.
    """

    def __init__(
        self,
        content_prob: float = 0.2,
        content_scale: float = 0.1,
        box_prob: float = 0.2,
        box_pixels: float = 25.0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.box = CornerPerturbation(box_prob, box_pixels, generator=generator)
        self.content = GaussianPerturbation(
            content_prob, content_scale, leaves="content", generator=generator
        )

    def __call__(self, state: ProposalState, step: int) -> ProposalState:
        return self.content(self.box(state, step), step)

    def __repr__(self) -> str:
        return f"SparseRCNNRAP({self.box!r}, {self.content!r})"
