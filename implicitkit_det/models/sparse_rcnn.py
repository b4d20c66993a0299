"""Sparse R-CNN: learned proposals refined by six stages with their own weights, each one supervised."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .adamixer import AdaMixer
from .detector import RefinementStage
from .proposals import LearnedProposals

__all__ = ["SparseRCNN"]


class SparseRCNN(AdaMixer):
    """``L`` explicit stages from the learned proposals: ``y_l = S_l(y_{l-1})``, ``y_0`` the proposals.

    Every stage's prediction is supervised (``stage0`` ... ``stage{L-1}``, equal weights, each with its own
    Hungarian match); the last one is the detection (top-k of the ``N x C`` sigmoid scores, no NMS). The
    stage loop is AdaMixer's, with :class:`~.sparse_rcnn_stage.SparseRCNNStage` layers: stage ``l > 0``
    detaches its box input, so its box is trained only through its own regression, while the proposal
    features carry gradients through the whole stack and the learned proposal boxes are trained through
    the first stage.

    Arguments:
        backbone, criterion, num_select: see :class:`~.detector.QueryDetector`.
        neck: an :class:`~.fpn.FPN`.
        proposals: the :class:`~.proposals.LearnedProposals` (held as ``queries``, the detectors' name for
            the decoder's starting state).
        stages: the stages, applied in order; the first should keep its box input (``detach_boxes=False``).

    Reference: Sun et al., "Sparse R-CNN: end-to-end object detection with learnable proposals", CVPR 2021.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        proposals: LearnedProposals,
        stages: Sequence[RefinementStage],
        **kwargs,
    ) -> None:
        super().__init__(backbone, neck, proposals, stages, **kwargs)
