"""One-to-one matching of predictions to ground truth by the Hungarian algorithm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

__all__ = ["HungarianMatcher", "check_target_fields", "check_targets", "focal_cost"]


def focal_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The focal classification cost of assigning each prediction to each target.

    With ``p = sigmoid(logit)`` of the target's class, the cost is the focal loss of calling that class
    positive minus the focal loss of calling it negative:

        cost = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p))

    (with both weights 1 for ``alpha < 0``, torchvision's "no weighting").

    Arguments:
        logits: ``[N, C]`` class logits.
        labels: ``[M]`` target labels in ``0..C-1``.

    Returns:
        The ``[N, M]`` cost.
    """
    logits = logits[:, labels]
    p = logits.sigmoid()
    # alpha < 0: no weighting, as torchvision's sigmoid_focal_loss (the criterion's) reads it.
    a_pos, a_neg = (1.0, 1.0) if alpha < 0 else (alpha, 1 - alpha)
    # log(sigmoid(x)) through logsigmoid stays finite for large |x|, where log(p) would hit log(0).
    pos = a_pos * (1 - p) ** gamma * -nn.functional.logsigmoid(logits)
    neg = a_neg * p**gamma * -nn.functional.logsigmoid(-logits)
    return pos - neg


class HungarianMatcher(nn.Module):
    """Match each image's predictions to its targets at the least total cost (DEQDet's / AdaMixer's costs).

    The cost of prediction ``i`` for target ``j`` is

        C_ij = w_cls focal_cost(logit_i, label_j) + w_l1 ||b_i - t_j||_1 - w_giou GIoU(b_i, t_j)

    on normalised xyxy boxes; ``scipy.optimize.linear_sum_assignment`` picks the assignment of least total
    cost, matching ``min(N, M)`` pairs.

    Arguments:
        cost_class, cost_bbox, cost_giou: the weights ``w_cls`` (2.0), ``w_l1`` (5.0), ``w_giou`` (2.0).
        focal_alpha, focal_gamma: of the focal cost (0.25, 2.0).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """The ``[N, M]`` cost of one image: ``logits`` [N, C], ``boxes`` [N, 4], ``labels`` [M],
        ``target_boxes`` [M, 4] (boxes normalised xyxy)."""
        logits, boxes, target_boxes = logits.float(), boxes.float(), target_boxes.float()
        cls = focal_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        l1 = torch.cdist(boxes, target_boxes, p=1)
        giou = generalized_box_iou(boxes, target_boxes)
        # A target without area (a point, a line) and a prediction without area have no IoU (0 / 0): such
        # pairs are scored as the criterion's GIoU loss scores them, with its epsilon, not as NaN.
        flat = (target_boxes[:, 2:] <= target_boxes[:, :2]).any(dim=1)
        if bool(flat.any()):
            pairs = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)[:, None] & flat[None, :]
            n, m = pairs.shape
            loss = generalized_box_iou_loss(
                boxes[:, None].expand(n, m, 4), target_boxes[None].expand(n, m, 4)
            )
            giou = torch.where(pairs, 1.0 - loss, giou)
        return self.cost_class * cls + self.cost_bbox * l1 - self.cost_giou * giou

    @torch.no_grad()
    def forward(
        self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Any]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        Arguments:
            outputs: ``pred_logits`` [B, N, C] and ``pred_boxes`` [B, N, 4] (normalised xyxy).
            targets: per image, ``labels`` [M_b] and ``boxes_normalized`` [M_b, 4].

        Returns:
            Per image ``(pred_idx, tgt_idx)``, int64 tensors of length ``min(N, M_b)``, sorted by
            ``pred_idx``; empty when the image has no targets.

        Raises:
            ``FloatingPointError`` if a cost is NaN or infinite (usually NaN predicted boxes or
            logits from a diverged model).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} images in the outputs but {len(targets)} targets")
        check_target_fields(targets)
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in targets]

        # One cost matrix over all targets of the batch, moved to the CPU at once, then split per image.
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes_normalized"] for t in targets]).to(boxes.device)
        check_targets(labels, tgt_boxes, logits.shape[-1], sizes, targets)
        bsz, n = logits.shape[:2]
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), labels, tgt_boxes)
        cost = cost.view(bsz, n, -1).cpu()

        if not torch.isfinite(cost).all():  # one check for the batch; then which image, if one of its own
            error = _non_finite_cost(cost, sizes, logits, boxes, targets)
            if error is not None:
                raise error
        blocks = np.split(cost.numpy(), np.cumsum(sizes)[:-1], axis=-1)  # image b's columns: block b
        indices = []
        for b, block in enumerate(blocks):
            rows, cols = linear_sum_assignment(block[b])
            indices.append((torch.from_numpy(rows).long(), torch.from_numpy(cols).long()))
        return indices


def _non_finite_cost(
    cost: Tensor, sizes: list[int], logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Any]]
) -> FloatingPointError | None:
    """The error for a NaN or infinite matching cost of an image's own predictions and targets, naming the
    first such image and why; None when only pairs across images (never matched) are not finite."""
    blocks = cost.split(sizes, dim=-1)
    b = next((b for b, block in enumerate(blocks) if not torch.isfinite(block[b]).all()), None)
    if b is None:
        return None
    return FloatingPointError(
        f"matching cost of image {b} (image_id {targets[b].get('image_id')}) is NaN or infinite: "
        f"pred_logits finite: {bool(torch.isfinite(logits[b]).all())}, pred_boxes finite: "
        f"{bool(torch.isfinite(boxes[b]).all())}, target boxes finite: "
        f"{bool(torch.isfinite(targets[b]['boxes_normalized']).all())}. The model has likely "
        "diverged: lower the learning rate or check the inputs."
    )


def check_target_fields(targets: Sequence[Mapping[str, Any]]) -> None:
    """Refuse, per image and before they are joined, targets the matcher would misread: without ``labels``
    and ``boxes_normalized``, with labels that are not integers (joined with another image's int64 labels,
    bool ones became classes 0 and 1), or with as many labels as boxes not."""
    for image, target in enumerate(targets):
        where = f"image {image} (image_id {target.get('image_id')})"
        if "labels" not in target or "boxes_normalized" not in target:
            raise KeyError(
                f"the target of {where} has {sorted(target)}; the detectors need 'labels' (class indices) and "
                "'boxes_normalized' (xyxy divided by the image's (w, h, w, h)), as the dataset's transforms "
                "give them (torchvision-style pixel 'boxes': divide by the image size)"
            )
        dtype = torch.as_tensor(target["labels"]).dtype
        if not _integer(dtype):
            raise TypeError(
                f"target labels must be integer class indices; {where} has {dtype} labels (an image without "
                "objects needs torch.zeros(0, dtype=torch.int64), not torch.tensor([]))"
            )
        if len(target["labels"]) != len(target["boxes_normalized"]):
            raise ValueError(
                f"{where} has {len(target['labels'])} labels for {len(target['boxes_normalized'])} boxes: "
                "one label per box"
            )


def check_targets(
    labels: Tensor, boxes: Tensor, num_classes: int, sizes: list[int], targets: Sequence[Mapping[str, Any]]
) -> None:
    """Refuse targets that would be matched and scored wrongly without an error: a label outside
    ``0..num_classes-1`` (a negative one indexes from the end), or a box that is not normalised xyxy (corners
    swapped, or in pixels). One check for the batch; the message names the first bad image."""
    bad_label = (labels < 0) | (labels >= num_classes)
    # Normalised by the image's size, a box lies in [0, 1]; the margin leaves room for boxes past the edge.
    bad_box = (boxes[:, 2:] < boxes[:, :2]).any(dim=1) | (boxes.abs() > 2).any(dim=1)
    if not bool((bad_label | bad_box).any()):
        return
    if bool(bad_label.any()):
        raise ValueError(
            f"target labels of {_image_of(bad_label, sizes, targets)} include "
            f"{labels[bad_label].unique().tolist()}, outside 0..{num_classes - 1}: labels are class indices "
            "of the model's classifier (num_classes), not category ids"
        )
    raise ValueError(
        f"target boxes_normalized of {_image_of(bad_box, sizes, targets)} include {boxes[bad_box][0].tolist()}: "
        "boxes must be xyxy (x0 <= x1, y0 <= y1) divided by the image's (w, h, w, h), not pixels or cxcywh"
    )


def _integer(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and dtype != torch.bool


def _image_of(bad: Tensor, sizes: list[int], targets: Sequence[Mapping[str, Any]]) -> str:
    """The image that holds the first flagged target, by its place in the batch and its ``image_id``."""
    image = int(np.searchsorted(np.cumsum(sizes), int(bad.nonzero()[0]), side="right"))
    return f"image {image} (image_id {targets[image].get('image_id')})"
