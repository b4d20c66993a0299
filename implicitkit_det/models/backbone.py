"""A torchvision ResNet returning its four stages' features (strides 4, 8, 16, 32)."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["ResNetBackbone"]


def _resnet10(weights: None = None, **kwargs) -> resnet.ResNet:
    """ResNet-18 with one basic block per stage instead of two: for CPU-sized configurations."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


_DEPTHS = {
    "resnet10": _resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
}


class ResNetBackbone(nn.Module):
    """The four stages of a torchvision ResNet: ``C2..C5`` at strides 4, 8, 16, 32.

    Random initialisation by default. With ``weights`` (a local torchvision state-dict file, e.g. the
    ImageNet checkpoint saved beforehand) the batch norms are frozen, as usual when fine-tuning a
    pretrained backbone with small per-device batches, and the first ``frozen_stages`` stages are frozen.

    **Arguments**
    - `name`: ``"resnet50"``, ``"resnet34"``, ``"resnet18"``, or ``"resnet10"`` (one block per stage, built
      with torchvision's ``ResNet``; no published weights, for CPU-sized runs from scratch).
    - `weights`: path of a state dict for the torchvision model; its ``fc.*`` entries are ignored.
    - `frozen_bn`: use ``FrozenBatchNorm2d``; default: only when ``weights`` are given.
    - `frozen_stages`: freeze the stem and this many stages (0..4); default 1 with weights, else 0.

    **Attributes** `strides` (4, 8, 16, 32) and `channels` of the four outputs.
    """

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | os.PathLike | None = None,
        frozen_bn: bool | None = None,
        frozen_stages: int | None = None,
    ) -> None:
        super().__init__()
        if name not in _DEPTHS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_DEPTHS)}")
        frozen_bn = weights is not None if frozen_bn is None else frozen_bn
        frozen_stages = (1 if weights is not None else 0) if frozen_stages is None else frozen_stages
        net = _DEPTHS[name](weights=None, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"{weights} does not fit torchvision's {name}: missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}. Pass a state dict saved from torchvision.models.{name}()."
                )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = tuple(_out_channels(stage) for stage in self.stages)
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must lie in 0..4, got {frozen_stages}")
        if frozen_stages:
            for module in [self.stem, *self.stages][: frozen_stages + 1]:
                module.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` [B, 3, H, W] (H, W multiples of 32) -> ``[B, channels_j, H / s_j, W / s_j]`` per stage."""
        x = self.stem(images)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _out_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels
