"""The tiny Sparse R-CNNs learn: on two images of the bundled digits set they reach train AP50 >= 0.9."""

from __future__ import annotations

import pytest
import torch

from implicitkit_det.data import CocoDetectionDataset, collate_detection, make_eval_transforms
from implicitkit_det.engine import evaluate
from implicitkit_det.evaluation import CocoEvaluator
from implicitkit_det.models import build_model

STEPS = 160


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, overrides",
    [
        ("sparse_rcnn_tiny", {}),
        # A shorter DEQ schedule to keep the test quick.
        ("deq_sparse_rcnn_tiny", {"train_steps": 6, "supervise_steps": (1, 3, 6), "test_steps": 7}),
    ],
)
def test_tiny_sparse_rcnn_overfits_two_digits_images(tiny_digits, name, overrides):
    dataset = CocoDetectionDataset(
        tiny_digits.images("train"),
        tiny_digits.annotations("train"),
        transforms=make_eval_transforms(size=64, max_size=96),
    )
    batch = collate_detection([dataset[0], dataset[1]], size_divisor=32)
    torch.manual_seed(0)
    model = build_model(name, 10, num_queries=10, **overrides)
    # Sparse R-CNN's optimiser (AdamW, weight decay 1e-4, clipping at 1) at a CPU-run learning rate that
    # decays linearly to 0: without the decay the cascade's boxes still swing from step to step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / STEPS)
    history = []
    for _ in range(STEPS):
        losses = model.forward_backward(batch.images, batch.targets, mask=batch.mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        history.append(losses["loss"].item())
    stats = evaluate(
        model,
        [batch],
        CocoEvaluator(dataset.coco),
        device=torch.device("cpu"),
        label_to_category_id=dataset.label_to_category_id,
        verbose=False,
    )
    assert stats["images"] == 2
    assert stats["AP50"] >= 0.9, (stats["AP50"], stats["AP"], history[-5:])
    assert sum(history[-5:]) / 5 < 0.25 * history[0], history
