"""A small real detector for the engine tests: a conv stem, learned queries, the real criterion."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.ops import box_convert

from implicitkit_det.data import DetectionBatch
from implicitkit_det.evaluation import PostProcess
from implicitkit_det.losses import SetCriterion


class ToyDetector(nn.Module):
    """``model(images, targets, mask=...)``: losses in training, input-pixel detections in eval.

    A ``decoder`` submodule (so the optimiser's decoder group is exercised), a GroupNorm and a LayerNorm
    (for the no-decay option), and a dropout, so that a resumed run must restore the random state to give
    the same next step.
    """

    def __init__(
        self, num_classes: int = 3, num_queries: int = 6, width: int = 16, test_steps: int = 1
    ) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=4, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=4, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.query = nn.Embedding(num_queries, width)
        self.decoder = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(), nn.Dropout(0.1))
        self.cls = nn.Linear(width, num_classes)
        self.box = nn.Linear(width, 4)
        self.criterion = SetCriterion()
        self.post = PostProcess(num_select=10)
        self.test_steps = test_steps

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, Any]] | None = None,
        mask: torch.Tensor | None = None,
    ) -> Any:
        h = self.decoder(self.query.weight[None] + self.backbone(images)[:, None])
        boxes = box_convert(self.box(h).sigmoid() * 0.5 + 0.25, "cxcywh", "xyxy")
        outputs = {"pred_logits": self.cls(h), "pred_boxes": boxes}
        if self.training:
            return self.criterion(outputs, targets)
        sizes = torch.tensor([images.shape[-2:]] * len(images))  # boxes in (padded) input pixels
        return self.post(outputs, sizes)


def random_batch(
    generator: torch.Generator, batch: int = 2, size: int = 64, classes: int = 3
) -> DetectionBatch:
    """A batch of noise images, each with 1-2 random boxes."""
    images = torch.randn(batch, 3, size, size, generator=generator)
    targets = []
    for i in range(batch):
        m = 1 + i % 2
        xy = torch.rand(m, 2, generator=generator) * 0.5
        wh = 0.1 + torch.rand(m, 2, generator=generator) * 0.4
        norm = torch.cat([xy, xy + wh], dim=1)
        targets.append(
            {
                "boxes": norm * size,
                "boxes_normalized": norm,
                "labels": torch.randint(classes, (m,), generator=generator),
                "image_id": i,
                "size": torch.tensor([size, size]),
                "orig_size": torch.tensor([size, size]),
            }
        )
    return DetectionBatch(images, torch.zeros(batch, size, size, dtype=torch.bool), targets)
