"""The backbone's stem runs channels-last: the same features and gradients as the NCHW computation."""

import pytest
import torch

from implicitkit_det.models.backbone import ResNetBackbone


def _nchw_features(backbone: ResNetBackbone, images: torch.Tensor) -> list[torch.Tensor]:
    """The same modules applied in PyTorch's default layout (torchvision's ResNet forward)."""
    x = backbone.stem(images)
    features = []
    for stage in backbone.stages:
        x = stage(x)
        features.append(x)
    return features


def _grads(backbone: ResNetBackbone, features: list[torch.Tensor], weights: list[torch.Tensor]) -> list:
    backbone.zero_grad(set_to_none=True)
    sum((f * w).sum() for f, w in zip(features, weights) if f.requires_grad).backward()
    return [p.grad.clone() for p in backbone.parameters() if p.requires_grad]


@pytest.mark.parametrize(("norm", "frozen_stages"), [("batch", 0), ("frozen_stats", 1)])
def test_features_and_gradients_equal_the_nchw_computation(norm, frozen_stages):
    torch.manual_seed(0)
    backbone = ResNetBackbone("resnet10", norm=norm, frozen_stages=frozen_stages).double().train()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    loss_weights = [torch.randn(2, c, 64 // s, 96 // s, dtype=torch.float64)
                    for c, s in zip(backbone.channels, backbone.strides)]  # fmt: skip
    features = backbone(images)
    expected = _nchw_features(backbone, images)
    for got, want in zip(features, expected):
        assert got.is_contiguous()  # the stages and the decoder see NCHW
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads, expected_grads = _grads(backbone, features, loss_weights), _grads(backbone, expected, loss_weights)
    assert len(grads) == len(expected_grads) > 0
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
