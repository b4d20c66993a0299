"""The set-prediction loss: Hungarian matching, then focal, L1 and GIoU losses on the matched pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..collectives import all_reduce_mean
from .matcher import HungarianMatcher

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """DETR-style set loss with DEQDet's weights: focal x2, L1 x5, GIoU x2.

    Given a one-to-one match ``sigma`` of predictions to targets, with ``P`` the number of targets in the
    batch averaged over processes (at least 1):

        focal = sum_{i, c} FL(logit_ic, y_ic) / P      y_ic = 1 iff prediction i is matched to a target of class c
        l1    = sum_{(i, j) in sigma} ||b_i - t_j||_1 / P          (normalised xyxy boxes)
        giou  = sum_{(i, j) in sigma} (1 - GIoU(b_i, t_j)) / P
        loss  = w_focal focal + w_l1 l1 + w_giou giou

    where ``FL`` is the sigmoid focal loss (``alpha`` 0.25, ``gamma`` 2) over every prediction and class:
    unmatched predictions are negatives for all classes.

    **One-to-many matching** (``one_to_many = k > 1``, H-DETR's hybrid matching applied to every query): each
    image's targets are repeated ``k`` times before the match, so up to ``k`` predictions learn each object
    and ``P`` counts the repeated targets. More positives per step speed up learning; the duplicates it
    trains are then left for NMS at inference (``PostProcess(nms_iou=...)``).

    Arguments:
        matcher: the matcher used when no ``indices`` are given; default :class:`HungarianMatcher` with
            DEQDet's costs.
        weight_focal, weight_l1, weight_giou: the loss weights (2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: of the focal loss.
        one_to_many: ``k``, the predictions matched to each target (1: the one-to-one set loss).
    """

    def __init__(
        self,
        matcher: nn.Module | None = None,
        weight_focal: float = 2.0,
        weight_l1: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        one_to_many: int = 1,
    ) -> None:
        super().__init__()
        if one_to_many < 1:
            raise ValueError(
                f"one_to_many must be a positive number of matches per target, got {one_to_many}"
            )
        self.one_to_many = one_to_many
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"focal": weight_focal, "l1": weight_l1, "giou": weight_giou}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def num_positives(targets: Sequence[Mapping[str, Any]], device: torch.device) -> Tensor:
        """The loss normaliser ``P``: the batch's target count, averaged over processes, at least 1."""
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return all_reduce_mean(n).clamp(min=1.0)

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Any]],
        indices: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """The losses of one set of predictions.

        Arguments:
            outputs: ``pred_logits`` [B, N, C] and ``pred_boxes`` [B, N, 4] (normalised xyxy).
            targets: per image ``labels`` [M] and ``boxes_normalized`` [M, 4].
            indices: a precomputed match (as the matcher returns); matched here when None.

        Returns:
            ``focal``, ``l1``, ``giou`` (unweighted), ``loss_focal``, ``loss_l1``, ``loss_giou``
            (weighted) and ``loss``, their sum: scalar tensors.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if self.one_to_many > 1:
            k = self.one_to_many
            targets = [
                {**t, "labels": t["labels"].repeat(k), "boxes_normalized": t["boxes_normalized"].repeat(k, 1)}
                for t in targets
            ]
        if indices is None:
            indices = self.matcher(outputs, targets)
        num_pos = self.num_positives(targets, logits.device)

        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(
            logits.device
        )
        pred_idx = torch.cat([src for src, _ in indices]).to(logits.device)
        labels = torch.cat(
            [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices, strict=True)]
        )
        tgt_boxes = torch.cat(
            [
                t["boxes_normalized"][tgt.to(t["boxes_normalized"].device)]
                for t, (_, tgt) in zip(targets, indices, strict=True)
            ]
        ).to(boxes)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, pred_idx, labels.to(logits.device)] = 1.0
        focal = (
            sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_pos
        )

        matched = boxes[batch_idx, pred_idx]
        # With no targets the sums below are zero but still depend on `boxes`, so every parameter gets a
        # (zero) gradient, which DistributedDataParallel expects.
        l1 = (matched - tgt_boxes).abs().sum() / num_pos
        giou = generalized_box_iou_loss(matched, tgt_boxes, reduction="sum") / num_pos

        raw = {"focal": focal, "l1": l1, "giou": giou}
        out = dict(raw)
        for name, value in raw.items():
            out[f"loss_{name}"] = self.weights[name] * value
        out["loss"] = out["loss_focal"] + out["loss_l1"] + out["loss_giou"]
        return out
