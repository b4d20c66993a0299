"""A tiny DEQDet learns: the loss on two images of the bundled digits set falls clearly within 25 steps."""

from __future__ import annotations

import torch

from implicitkit_det.data import CocoDetectionDataset, collate_detection, make_eval_transforms
from implicitkit_det.models import build_model


def test_deqdet_tiny_overfits_two_digits_images(tiny_digits):
    dataset = CocoDetectionDataset(
        tiny_digits.images("train"),
        tiny_digits.annotations("train"),
        transforms=make_eval_transforms(size=64, max_size=96),
    )
    batch = collate_detection([dataset[0], dataset[1]])
    torch.manual_seed(0)
    # The tiny configuration, with a shorter DEQ schedule to keep the test quick.
    model = build_model(
        "deqdet_tiny", 10, num_queries=10, train_steps=6, supervise_steps=(1, 3, 6), test_steps=7
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(25):
        losses = model(batch.images, batch.targets, mask=batch.mask)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append(losses["loss"].item())
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-3:]) / 3 < 0.5 * history[0], history
