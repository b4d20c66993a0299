"""The official run's recipe details: backbone norms and weights by name, neck init, RAP corners, optimisers."""

from __future__ import annotations

import time

import pytest
import torch
from torchvision.models import resnet18

from implicitkit_det.engine.optim import RECIPES, param_groups, recipe_for
from implicitkit_det.models import (
    BoxPerturbation,
    ChannelMapper,
    FrozenStatsBatchNorm2d,
    ResNetBackbone,
    box_iof,
    build_model,
    xyxy_to_xyzr,
    xyzr_to_xyxy,
)


@pytest.fixture
def hub_cache(tmp_path):
    """torch.hub's cache moved to a temporary folder (restored afterwards)."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def _bn_layers(module: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_pretrained_layout_trains_affine_of_stages_2_to_4_with_fixed_statistics(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), path)
    backbone = ResNetBackbone("resnet18", weights=path).train()
    frozen = [*backbone.stem.parameters(), *backbone.stages[0].parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    for stage in backbone.stages[1:]:
        bns = _bn_layers(stage)
        assert bns and all(isinstance(bn, FrozenStatsBatchNorm2d) for bn in bns)
        assert all(bn.weight.requires_grad and bn.bias.requires_grad for bn in bns)
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    sum(f.sum() for f in backbone(torch.randn(2, 3, 64, 64) * 3 + 1)).backward()
    for key, value in backbone.state_dict().items():
        if "running" in key:
            assert torch.equal(value, stats[key]), key  # statistics stay the ImageNet ones in train mode
    assert backbone.stages[3][0].bn1.weight.grad.abs().sum() > 0  # the affine part is trained
    assert backbone.stages[0][0].bn1.weight.grad is None


def test_frozen_stats_batch_norm_equals_eval_mode_batch_norm():
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    frozen = FrozenStatsBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(frozen.train()(x), bn.eval()(x))


def test_weights_by_name_load_from_the_hub_cache(hub_cache):
    reference = resnet18()
    target = hub_cache / "checkpoints" / "resnet18-f37072fd.pth"  # the name ResNet18_Weights expects
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    model = build_model("deqdet_tiny", num_classes=3, backbone="resnet18", backbone_weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.backbone.stem[0].weight, reference.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(
        model.backbone.stages[3][1].bn2.running_var, reference.layer4[1].bn2.running_var, rtol=0, atol=0
    )
    assert isinstance(model.backbone.stem[1], FrozenStatsBatchNorm2d)


def test_weights_by_name_fail_fast_with_the_fix_when_they_cannot_be_fetched(hub_cache):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="backbone_weights") as info:
        ResNetBackbone("resnet18", weights="IMAGENET1K_V1")
    assert time.perf_counter() - start < 35  # the download waits at most 30 s on the network
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and "local path" in message
    with pytest.raises(ValueError, match="publishes no weights"):
        ResNetBackbone("resnet10", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ResNetBackbone("resnet18", weights="IMAGENET_V7")
    with pytest.raises(FileNotFoundError, match="no such file"):
        ResNetBackbone("resnet18", weights="missing/r18.pth")


def test_neck_convs_start_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    neck = ChannelMapper((64, 512), 256, kernel_size=3)
    for conv in neck.convs:
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert torch.all(conv.bias == 0)
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.95 * bound  # uniform over the whole Xavier range
    torch.manual_seed(0)
    default = ChannelMapper((64, 512), 256, kernel_size=3, init="pytorch")
    assert default.convs[0].bias.abs().sum() > 0
    assert build_model("adamixer_tiny", num_classes=3).neck.convs[0].bias.abs().sum() == 0


def test_box_noise_leaves_crossed_corners_unsorted_by_default():
    boxes = torch.tensor([[10.0, 10.0, 14.0, 14.0]]).repeat(1, 64, 1)  # 64 4-pixel boxes, 8-pixel noise
    state = {"content": torch.zeros(1, 64, 8), "xyzr": xyxy_to_xyzr(boxes)}

    def run(**kwargs) -> torch.Tensor:
        box = BoxPerturbation(prob=1.0, pixels=8.0, generator=torch.Generator().manual_seed(0), **kwargs)
        return xyzr_to_xyxy(box(state, 0)["xyzr"])[0]

    g = torch.Generator().manual_seed(0)
    torch.rand((), generator=g)  # the per-step draw
    corners = (boxes + 8.0 * torch.randn(boxes.shape, generator=g))[0]
    crossed = (corners[:, 2] < corners[:, 0]) & (corners[:, 3] >= corners[:, 1])
    straight = (corners[:, 2:] > corners[:, :2]).all(-1)
    assert crossed.any() and straight.any()

    official, resorted = run(), run(sort_corners=True)
    assert not BoxPerturbation().sort_corners
    torch.testing.assert_close(official[straight], resorted[straight])
    # Unsorted: the crossed side collapses to the clamp; the centre is kept. Sorted: the side is |x1 - x0|.
    assert ((official[crossed, 2] - official[crossed, 0]) < 1e-3).all()
    torch.testing.assert_close(
        (official[crossed, :2] + official[crossed, 2:]) / 2, (corners[crossed, :2] + corners[crossed, 2:]) / 2
    )
    torch.testing.assert_close(
        resorted[crossed, 2] - resorted[crossed, 0], (corners[crossed, 0] - corners[crossed, 2])
    )
    # Every other box's IoF towards a collapsed box is 0 (its area is ~0).
    iof = box_iof(official[None], official[None])[0]
    j = int(crossed.nonzero()[0])
    others = torch.arange(64) != j
    assert iof[others, j].max() < 1e-3


def test_sparse_rcnn_keeps_re_sorting_and_deqdet_config_passes_the_option():
    sparse = build_model("deq_sparse_rcnn_tiny", num_classes=3)
    boxes = torch.tensor([[[10.0, 10.0, 12.0, 12.0]]]).repeat(1, 32, 1)
    sparse.perturbation.box.prob = 1.0
    out = sparse.perturbation.box({"xyxy": boxes}, 0)["xyxy"]
    assert (out[..., 2:] >= out[..., :2]).all()
    assert not build_model("deqdet_tiny", num_classes=3).perturbation.box.sort_corners
    assert build_model("deqdet_tiny", num_classes=3, rap_sort_corners=True).perturbation.box.sort_corners


def test_adamixer_runs_with_its_published_optimiser():
    recipe = recipe_for("adamixer")
    assert (recipe.weight_decay, recipe.decoder_lr_mult, recipe.decoder_wd_mult) == (1e-4, 1.0, 1.0)
    assert (recipe.lr, recipe.clip_max_norm) == (2.5e-5, 1.0)
    deqdet = RECIPES["deqdet"]
    assert (deqdet.weight_decay, deqdet.decoder_lr_mult, deqdet.decoder_wd_mult) == (0.01, 4.0, 10.0)
    model = build_model("adamixer_tiny", num_classes=3)
    groups = param_groups(
        model,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        decoder_lr_mult=recipe.decoder_lr_mult,
        decoder_wd_mult=recipe.decoder_wd_mult,
    )
    assert {g["name"] for g in groups} == {"base", "decoder"}
    assert all(g["lr"] == 2.5e-5 and g["weight_decay"] == 1e-4 for g in groups)
