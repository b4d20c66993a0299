"""AdaMixer: six supervised stages with their own weights, the explicit baseline of DEQDet."""

from __future__ import annotations

import torch

from implicitkit_det.models import AdaMixer, build_model

TERMS = {"focal", "l1", "giou", "loss_focal", "loss_l1", "loss_giou", "loss"}


def tiny(seed: int = 0) -> AdaMixer:
    torch.manual_seed(seed)
    return build_model("adamixer_tiny", 5, num_queries=4)


def batch():
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=gen)
    targets = [
        {
            "labels": torch.tensor([0, 3]),
            "boxes_normalized": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.4, 0.9, 0.9]]),
        },
        {"labels": torch.tensor([2]), "boxes_normalized": torch.tensor([[0.2, 0.3, 0.6, 0.7]])},
    ]
    return images, targets


def test_every_stage_is_supervised_and_trained():
    model = tiny()
    assert len(model.stages) == 6
    assert len({id(s) for s in model.stages}) == 6  # own weights
    images, targets = batch()
    losses = model(images, targets)
    assert set(losses) == {f"stage{i}_{t}" for i in range(6) for t in TERMS} | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(losses[f"stage{i}_loss"] for i in range(6)))
    losses["loss"].backward()
    for i, stage in enumerate(model.stages):
        assert stage.mixing.generator.weight.grad.abs().sum() > 0, i
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.neck.convs[-1].weight.grad.abs().sum() > 0


@torch.no_grad()
def test_inference_is_the_last_stage_of_the_chain():
    model = tiny().eval()
    images, _ = batch()
    sizes = model.image_sizes(images)
    features = model.features(images)
    state = model.queries(sizes)
    for stage in model.stages:
        state = stage(state, features, sizes)
    want = model.stages[-1].predict(state, sizes)
    got = model.predict(images)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    detections = model(images)
    assert [d["boxes"].shape for d in detections] == [(20, 4), (20, 4)]  # N x C = 4 x 5 < 100


def test_neck_is_one_by_one_without_relu():
    with torch.device("meta"):
        model = build_model("adamixer_r50_1x", 80)
    assert all(conv.kernel_size == (1, 1) for conv in model.neck.convs)
    assert isinstance(model.neck.act, torch.nn.Identity)
    assert all(stage.sampling.num_points == 32 for stage in model.stages)
