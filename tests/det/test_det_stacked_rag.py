"""DEQ detectors with stacked RAG branches: the losses and gradients of the branches built one by one."""

from __future__ import annotations

import pytest
import torch
from det_engine_toy import random_batch

from implicitkit_det.models import build_model

CLASSES = 10


def losses_and_grads(config: str, stacked: bool, data) -> tuple[dict, dict]:
    torch.manual_seed(3)
    model = build_model(
        config, CLASSES, num_queries=6, backbone_norm="frozen", train_steps=4, supervise_steps=(1, 2, 4),
        stack_rag_branches=stacked,
    )  # fmt: skip
    torch.manual_seed(7)  # the same perturbation draws in both runs
    losses = model(data.images, data.targets, mask=data.mask)
    losses["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("config", ["deqdet_tiny", "deq_sparse_rcnn_tiny"])
def test_stacked_rag_branches_equal_branches_one_by_one(config, float64):
    data = random_batch(torch.Generator().manual_seed(0), batch=2, size=64, classes=CLASSES)
    want_losses, want_grads = losses_and_grads(config, False, data)
    got_losses, got_grads = losses_and_grads(config, True, data)
    assert list(got_losses) == list(want_losses)
    assert any(k.startswith("rag_s4_") for k in got_losses)
    for key, value in want_losses.items():
        torch.testing.assert_close(got_losses[key], value, rtol=1e-10, atol=1e-12, msg=key)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-9, atol=1e-12 * scale, msg=name)
    assert float(want_grads["refine_layer.cls_head.3.weight"].abs().max()) > 0  # F is trained by the branches
