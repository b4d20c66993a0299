"""One decoder layer: parameter counts, initialisation, 3D sampling, mixing and attention."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

from implicitkit_det.models import (
    AdaMixerStage,
    AdaptiveMixing,
    AdaptiveSampling3D,
    FrozenStatsBatchNorm2d,
    InitialQueries,
    IoFSelfAttention,
    ResNetBackbone,
    build_model,
    sample_pyramid,
    xyxy_to_xyzr,
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("points", "want"), [(32, 18_378_716), (64, 22_688_092)])
def test_stage_parameter_count(points, want):
    """One AdaMixer stage (P = 32) and one DEQDet layer (P = 64), heads with 80 classes included."""
    with torch.device("meta"):
        stage = AdaMixerStage(80, num_points=points)
    assert count(stage) == want


@pytest.mark.parametrize(
    ("name", "decoder", "queries"),
    [
        ("deqdet_r50_1x", 2 * 22_688_092, 100 * 256),
        ("deqdet_r50_2x", 2 * 22_688_092, 300 * 256),
        ("adamixer_r50_1x", 6 * 18_378_716, 100 * 256),
    ],
)
def test_paper_configs_parameter_counts(name, decoder, queries):
    with torch.device("meta"):
        model = build_model(name, 80)
    groups = {k: sum(p.numel() for p in v) for k, v in model.parameters_by_part().items()}
    assert groups["decoder"] == decoder
    assert groups["queries"] == queries
    assert groups["backbone"] == 23_508_032  # torchvision's ResNet-50 without its classifier
    # The decoders as the paper states them: 45.38 M (G + F) against 110.27 M (six stages).
    assert f"{decoder / 1e6:.2f}" == {"deqdet": "45.38", "adamixer": "110.27"}[name.split("_")[0]]


def test_sampling_init_grid_and_level_offset():
    sampling = AdaptiveSampling3D(dim=32, num_points=64, num_groups=4)
    assert torch.count_nonzero(sampling.offsets.weight) == 0
    bias = sampling.offsets.bias.view(4, 64, 3)
    centres = (torch.arange(8) + 0.5) / 8 - 0.5
    grid = torch.cartesian_prod(centres, centres)  # (dy, dx) pairs of the 8 x 8 cell centres
    for g in range(4):
        got = torch.stack([bias[g, :, 1], bias[g, :, 0]], dim=-1)  # as (dy, dx)
        torch.testing.assert_close(got, grid)
    assert (bias[..., 2] == -1).all()
    # At init every query samples its box on that grid, one level finer than its own scale.
    xyzr = xyxy_to_xyzr(torch.tensor([[[0.0, 0.0, 64.0, 32.0], [10.0, 10.0, 26.0, 26.0]]]))
    points = sampling.points(torch.randn(1, 2, 32), xyzr)
    assert points.shape == (1, 2, 4, 64, 3)
    # The 64 x 32 box's outermost grid points sit half a cell (64 / 16, 32 / 16) inside its edges.
    torch.testing.assert_close(points[0, 0, 0, :, 0].min(), torch.tensor(0.0 + 64 / 16))
    torch.testing.assert_close(points[0, 0, 0, :, 1].max(), torch.tensor(32.0 - 32 / 16))
    torch.testing.assert_close(points[0, :, :, :, 2], xyzr[0, :, None, None, 2].expand(2, 4, 64) - 1)


def test_sampling_init_uniform_when_not_square():
    bias = AdaptiveSampling3D(dim=32, num_points=32).offsets.bias.view(4, 32, 3)
    assert bias[..., :2].abs().max() <= 0.5 and bias[..., :2].std() > 0.1
    assert (bias[..., 2] == -1).all()


def test_sample_pyramid_reads_pixel_centres_and_blends_levels():
    strides = (4, 8)
    # Level j is constant over space per group, except group 0 of level 0 which holds its pixel index.
    f0 = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16).repeat(1, 8, 1, 1)  # stride 4: 64 px
    f1 = torch.full((1, 8, 8, 8), 1000.0)  # stride 8
    i, j = 5, 9
    x, y = (j + 0.5) * 4, (i + 0.5) * 4  # the centre of pixel (i, j) of level 0
    z = 2.7
    points = torch.tensor([x, y, z]).view(1, 1, 1, 1, 3).expand(1, 1, 2, 1, 3)  # 2 groups, 1 point
    out = sample_pyramid([f0, f1], points, strides)
    assert out.shape == (1, 1, 2, 1, 4)
    w = torch.softmax(torch.tensor([-((z - 2) ** 2) / 2, -((z - 3) ** 2) / 2]), dim=0)
    torch.testing.assert_close(out[0, 0, 0, 0], (w[0] * (i * 16 + j) + w[1] * 1000.0).expand(4))
    # Outside the image: zero padding.
    far = torch.tensor([-100.0, -100.0, 2.0]).view(1, 1, 1, 1, 3).expand(1, 1, 2, 1, 3)
    assert sample_pyramid([f0, f1], far, strides).abs().max() == 0


def test_sample_pyramid_reads_stacked_rows_from_their_images():
    """Points of r stacked blocks of the batch read image i for row j B + i, as with a copy of the maps per block."""
    gen = torch.Generator().manual_seed(0)
    strides, blocks, batch = (4, 8), 3, 2
    features = [torch.randn(batch, 8, 16, 16, generator=gen), torch.randn(batch, 8, 8, 8, generator=gen)]
    points = torch.rand(blocks * batch, 5, 2, 3, 3, generator=gen) * torch.tensor([64.0, 64.0, 2.0]) + 1.5
    out = sample_pyramid(features, points, strides)
    copied = [level.repeat(blocks, 1, 1, 1) for level in features]
    torch.testing.assert_close(out, sample_pyramid(copied, points, strides), rtol=0, atol=0)
    for row in range(blocks * batch):  # and each row alone on its own image
        image = [level[row % batch : row % batch + 1] for level in features]
        torch.testing.assert_close(out[row : row + 1], sample_pyramid(image, points[row : row + 1], strides))
    with pytest.raises(ValueError, match="multiple of the images"):
        sample_pyramid(features, points[:3], strides)


def test_mixing_generator_starts_at_zero_weight():
    mixing = AdaptiveMixing(dim=32, feature_dim=32, num_points=4, out_points=8, num_groups=4)
    assert torch.count_nonzero(mixing.generator.weight) == 0
    assert mixing.generator.out_features == 4 * (8 * 8 + 4 * 8)
    assert torch.count_nonzero(mixing.generator.bias) > 0  # the matrices' starting values
    # So every query gets the same mixing matrices: swapping the queries' contents only swaps the residual.
    sampled = torch.randn(1, 1, 4, 4, 8).expand(1, 2, 4, 4, 8)
    content = torch.randn(1, 2, 32)
    out, swapped = mixing(sampled, content), mixing(sampled, content.flip(1))
    torch.testing.assert_close(out.flip(1), swapped)


def test_stage_init_heads_and_tau():
    stage = AdaMixerStage(10, dim=64, num_heads=4, num_points=4, out_points=8, ffn_dim=128)
    assert (
        torch.count_nonzero(stage.reg_head[-1].weight) == 0
        and torch.count_nonzero(stage.reg_head[-1].bias) == 0
    )
    torch.testing.assert_close(stage.cls_head[-1].bias, torch.full((10,), -math.log(99.0)))
    assert (stage.attention.tau >= 0).all() and (stage.attention.tau <= 4).all()
    assert stage.cls_head[0].bias is not None  # the hidden head layers have a bias (counted above)


def test_stage_detaches_its_box_input_and_keeps_it_at_init():
    stage = AdaMixerStage(10, dim=64, num_heads=4, num_points=4, out_points=8, ffn_dim=128)
    sizes = torch.tensor([[64.0, 96.0]])
    state = InitialQueries(5, 64)(sizes)
    xyzr = state["xyzr"].clone().requires_grad_()
    features = [torch.randn(1, 64, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    out = stage({"content": state["content"], "xyzr": xyzr}, features)
    torch.testing.assert_close(out["xyzr"], xyzr.detach())  # zero-init regressor: the box is kept
    out["xyzr"].sum().backward()
    assert xyzr.grad is None  # the box enters each layer detached
    boxes = stage.predict(out, sizes)["pred_boxes"]
    torch.testing.assert_close(boxes, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, 5, 4), atol=1e-5, rtol=0)


def test_attention_bias_shields_disjoint_boxes():
    """With a large tau, a query does not attend to a query whose box does not overlap its own."""
    attention = IoFSelfAttention(dim=32, num_heads=4)
    with torch.no_grad():
        attention.tau.fill_(10.0)
    # Query 0 lies inside query 1's box (IoF 1, bias 0); query 2 is far from both (IoF 0, bias -161).
    xyzr = xyxy_to_xyzr(
        torch.tensor([[[2.0, 2.0, 8.0, 8.0], [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]])
    )
    content = torch.randn(1, 3, 32, requires_grad=True)
    (attention(content, xyzr)[0, 0] * torch.randn(32)).sum().backward()
    grad = content.grad[0].abs().sum(-1)
    assert grad[1] > 1e-3 and grad[2] < 1e-20
    assert attention.tau.grad is not None  # tau is trained through the bias, the boxes are not


def test_backbone_loads_local_weights_and_freezes(tmp_path):
    reference = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1])  # the layout of "resnet10"
    path = tmp_path / "resnet10.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNetBackbone("resnet10", weights=path)
    torch.testing.assert_close(backbone.stem[0].weight, reference.conv1.weight)
    assert isinstance(backbone.stem[1], FrozenStatsBatchNorm2d)  # the official layout
    assert isinstance(ResNetBackbone("resnet10", weights=path, norm="frozen").stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in [*backbone.stem.parameters(), *backbone.stages[0].parameters()])
    assert all(p.requires_grad for p in backbone.stages[1].parameters())
    features = backbone(torch.randn(1, 3, 64, 96))
    assert [f.shape[1:] for f in features] == [
        (c, 64 // s, 96 // s) for c, s in zip((64, 128, 256, 512), (4, 8, 16, 32))
    ]
    with pytest.raises(ValueError, match="does not fit"):
        ResNetBackbone("resnet18", weights=path)
    plain = ResNetBackbone("resnet10")  # random init: trainable batch norms, nothing frozen
    assert isinstance(plain.stem[1], torch.nn.BatchNorm2d) and all(
        p.requires_grad for p in plain.parameters()
    )
