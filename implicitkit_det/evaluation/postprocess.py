"""From model outputs to detections in original-image pixels, and to COCO result dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_convert

__all__ = ["PostProcess", "to_coco_results"]


class PostProcess(nn.Module):
    """Top-k detections over all (query, class) pairs; no NMS unless asked.

    Scores are ``sigmoid(pred_logits)`` flattened over ``N x C``; the `num_select` best pairs give the
    detections, so one query may yield several classes. Boxes are scaled from normalised xyxy to the
    original image: ``box * (W, H, W, H)``. With `nms_iou`, of the detections of one class that overlap by
    more than `nms_iou` (IoU) only the best scored is kept (``torchvision.ops.batched_nms``).

    A set-prediction detector learns to leave one detection per object (the one-to-one match makes every
    other query a negative), so the published detectors use no NMS. Early in training the duplicates are not
    yet suppressed: on the digits demo after 5 minutes, queries that converge onto the same object carry
    confident scores, and NMS at 0.7 lifts its AP from 0.26 to 0.46.

    Arguments:
        num_select: detections kept per image (100 or 300 for COCO).
        nms_iou: None (the published detectors) or the IoU above which a lower-scored detection of the
            same class is removed.
    """

    def __init__(self, num_select: int = 100, nms_iou: float | None = None) -> None:
        super().__init__()
        if isinstance(num_select, bool) or not isinstance(num_select, int) or num_select < 1:
            raise ValueError(
                f"num_select (detections kept per image) must be an integer >= 1, got {num_select!r}"
            )
        if nms_iou is not None and not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in (0, 1] or None, got {nms_iou}")
        self.num_select = num_select
        self.nms_iou = nms_iou

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image.

        Arguments:
            outputs: ``pred_logits`` [B, N, C], ``pred_boxes`` [B, N, 4] normalised xyxy.
            orig_sizes: [B, 2] original ``(h, w)`` per image (the targets' ``orig_size``, stacked).

        Returns:
            Per image ``{"scores": [k], "labels": [k] int64, "boxes": [k, 4] xyxy pixels}``, sorted
            by decreasing score, ``k = min(num_select, N * C)``; scores and boxes in float32 whatever the
            model's precision.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if orig_sizes.shape != (len(logits), 2):
            raise ValueError(
                f"orig_sizes has shape {tuple(orig_sizes.shape)} for {len(logits)} images; give one (h, w) per "
                "image, [B, 2], e.g. torch.stack([t['orig_size'] for t in targets])"
            )
        n, c = logits.shape[1:]
        k = min(self.num_select, n * c)
        # Scores and boxes in float32 whatever the model's precision (torchvision's NMS wants one dtype).
        scores, flat = logits.float().sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(flat, c, rounding_mode="floor")
        labels = flat % c
        picked = boxes.gather(1, query[..., None].expand(-1, -1, 4)).float()
        h, w = orig_sizes.to(picked).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]
        picked = picked * scale
        detections = [
            {"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, picked, strict=True)
        ]
        if self.nms_iou is None:
            return detections
        # batched_nms returns the kept indices by decreasing score: the order stays sorted.
        kept = (batched_nms(d["boxes"], d["scores"], d["labels"], self.nms_iou) for d in detections)
        return [
            {key: value[keep] for key, value in d.items()} for d, keep in zip(detections, kept, strict=True)
        ]

    def extra_repr(self) -> str:
        return f"num_select={self.num_select}, nms_iou={self.nms_iou}"


def to_coco_results(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}`` from per-image detections.

    Arguments:
        detections: per image ``scores``, ``labels`` (contiguous) and ``boxes`` (xyxy pixels of the
            original image), e.g. from :class:`PostProcess`.
        image_ids: the images' ids, in the same order.
        label_to_category_id: maps a contiguous label to the annotation file's category id (the dataset's
            ``label_to_category_id``); identity when None.
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections for {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(detections, image_ids, strict=True):
        labels = det["labels"]
        if label_to_category_id is not None and labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(label_to_category_id):
                raise ValueError(
                    f"image {image_id}: labels {low}..{high} outside the {len(label_to_category_id)} classes of "
                    "label_to_category_id (contiguous labels 0..C-1 expected)"
                )
        xywh = box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist(), strict=True):
            category = label_to_category_id[label] if label_to_category_id is not None else int(label)
            results.append(
                {"image_id": int(image_id), "category_id": int(category), "bbox": box, "score": score}
            )
    return results
