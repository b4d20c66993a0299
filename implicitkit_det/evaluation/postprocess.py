"""From model outputs to detections in original-image pixels, and to COCO result dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

__all__ = ["PostProcess", "to_coco_results"]


class PostProcess(nn.Module):
    """Top-k detections over all (query, class) pairs, no NMS.

    Scores are ``sigmoid(pred_logits)`` flattened over ``N x C``; the `num_select` best pairs give the
    detections, so one query may yield several classes. Boxes are scaled from normalised xyxy to the
    original image: ``box * (W, H, W, H)``.

    Arguments:
        num_select: detections kept per image (100 or 300 for COCO).
    """

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image.

        Arguments:
            outputs: ``pred_logits`` [B, N, C], ``pred_boxes`` [B, N, 4] normalised xyxy.
            orig_sizes: [B, 2] original ``(h, w)`` per image (the targets' ``orig_size``, stacked).

        Returns:
            Per image ``{"scores": [k], "labels": [k] int64, "boxes": [k, 4] xyxy pixels}``, sorted
            by decreasing score, ``k = min(num_select, N * C)``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        n, c = logits.shape[1:]
        k = min(self.num_select, n * c)
        scores, flat = logits.sigmoid().flatten(1).topk(k, dim=1)
        query = torch.div(flat, c, rounding_mode="floor")
        labels = flat % c
        picked = boxes.gather(1, query[..., None].expand(-1, -1, 4)).float()
        h, w = orig_sizes.to(picked).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]
        picked = picked * scale
        return [
            {"scores": s, "labels": lab, "boxes": b} for s, lab, b in zip(scores, labels, picked, strict=True)
        ]


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
        xywh = box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        for box, score, label in zip(xywh, det["scores"].tolist(), det["labels"].tolist(), strict=True):
            category = label_to_category_id[label] if label_to_category_id is not None else int(label)
            results.append(
                {"image_id": int(image_id), "category_id": int(category), "bbox": box, "score": score}
            )
    return results
