"""A torchvision ResNet returning its four stages' features (strides 4, 8, 16, 32)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_model_weights, resnet
from torchvision.ops import FrozenBatchNorm2d

__all__ = ["FrozenStatsBatchNorm2d", "ResNetBackbone", "weights_cache_path"]

BackboneNorm = Literal["frozen_stats", "frozen", "batch"]
#: The layout of a backbone built with pre-trained weights, unless given: its norm and frozen stages.
PRETRAINED_NORM: BackboneNorm = "frozen_stats"
PRETRAINED_FROZEN_STAGES = 1
# Seconds a download of published weights may wait on the network before it counts as failed.
_DOWNLOAD_TIMEOUT_S = 30.0


def _resnet10(weights: None = None, **kwargs) -> resnet.ResNet:
    """ResNet-18 with one basic block per stage instead of two: for CPU-sized configurations."""
    return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], **kwargs)


_DEPTHS = {
    "resnet10": _resnet10,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
}


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that always normalises with its running statistics; its scale and shift stay trainable.

        y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

    in training and evaluation alike (mmdetection's ``norm_eval=True`` with ``requires_grad=True``): the
    ImageNet statistics are kept, while the affine part adapts to the new task. The state dict is
    ``nn.BatchNorm2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


_NORMS: dict[str, type[nn.Module]] = {
    "frozen_stats": FrozenStatsBatchNorm2d,
    "frozen": FrozenBatchNorm2d,
    "batch": nn.BatchNorm2d,
}


class ResNetBackbone(nn.Module):
    """The four stages of a torchvision ResNet: ``C2..C5`` at strides 4, 8, 16, 32.

    Random initialisation by default. With ``weights`` (published ones by name, or a local state-dict
    file) the layout is the official DEQDet / AdaMixer run's: the stem and the first stage are frozen, and
    every batch norm normalises with its ImageNet statistics while the scale and shift of stages 2-4 are
    trained (:class:`FrozenStatsBatchNorm2d`).

    Published weights are fetched through torchvision's weights API, so they land in (and are read from)
    torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/`` (see :func:`weights_cache_path`). Without network
    access, put the file there under its published name, or pass its path.

    Arguments:
        name: ``"resnet50"``, ``"resnet34"``, ``"resnet18"``, or ``"resnet10"`` (one block per stage, built
            with torchvision's ``ResNet``; no published weights, for CPU-sized runs from scratch).
        weights: a torchvision weights name of this depth (``"IMAGENET1K_V1"``, what the official configs
            load; ``"IMAGENET1K_V2"``; ``"DEFAULT"``), a ``WeightsEnum`` member, or the path of a state dict
            for
            the torchvision model; ``fc.*`` entries are ignored.
        norm: ``"frozen_stats"`` (running statistics fixed, affine trained), ``"frozen"``
            (``FrozenBatchNorm2d``: statistics and affine fixed) or ``"batch"`` (``nn.BatchNorm2d``,
            statistics
            updated in training); default ``"frozen_stats"`` with weights, else ``"batch"``.
        frozen_stages: 1..4: freeze the stem and this many stages (weights and normalisation statistics);
            0: freeze nothing; default 1 with weights, else 0.

    Attributes:
        `strides` (4, 8, 16, 32) and `channels` of the four outputs.
    """

    strides = (4, 8, 16, 32)

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | os.PathLike | WeightsEnum | None = None,
        norm: BackboneNorm | None = None,
        frozen_stages: int | None = None,
    ) -> None:
        super().__init__()
        if name not in _DEPTHS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_DEPTHS)}")
        norm = (PRETRAINED_NORM if weights is not None else "batch") if norm is None else norm
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
        frozen_stages = (
            (PRETRAINED_FROZEN_STAGES if weights is not None else 0)
            if frozen_stages is None
            else frozen_stages
        )
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must lie in 0..4, got {frozen_stages}")
        net = _DEPTHS[name](weights=None, norm_layer=_NORMS[norm])
        if weights is not None:
            _load(net, name, weights)
        self.norm = norm
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.channels = tuple(_out_channels(stage) for stage in self.stages)
        self.frozen = [self.stem, *self.stages][: frozen_stages + 1 if frozen_stages else 0]
        for module in self.frozen:
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        """As ``nn.Module.train``, but frozen stages stay in eval mode: their BatchNorm statistics are part of
        what is frozen (with ``norm="batch"`` they would otherwise keep updating, as mmdetection's
        ``norm_eval`` also prevents)."""
        super().train(mode)
        for module in self.frozen:
            module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """``images`` [B, 3, H, W] (H, W multiples of 32) -> ``[B, channels_j, H / s_j, W / s_j]`` per stage."""
        # The stem runs channels-last: PyTorch's CPU max pooling is vectorised over channels only in that
        # layout (about 10x faster than NCHW at a 64-channel stem, the stem 2.5x). Its output goes back to
        # NCHW, where the stages' convolutions (and the decoder's sampling of their features) are fastest.
        x = self.stem(images.contiguous(memory_format=torch.channels_last))
        if x.requires_grad:  # a trained stem: its backward too runs channels-last (max pooling's 5x faster)
            x.register_hook(_channels_last)
        x = x.contiguous()
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def _channels_last(grad: Tensor) -> Tensor:
    """The stages' NCHW gradient in the stem's layout: mixed layouts send its kernels down slow paths."""
    return grad.contiguous(memory_format=torch.channels_last)


def _out_channels(stage: nn.Sequential) -> int:
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def _published(name: str, weights: str | WeightsEnum) -> WeightsEnum | None:
    """The weights enum member `weights` names for backbone `name`, or None when it is not a name."""
    if isinstance(weights, WeightsEnum):
        return weights
    if os.sep in weights or "." in weights or Path(weights).exists():
        return None  # a path
    try:
        enum = get_model_weights(name)
    except ValueError:
        raise ValueError(
            f"backbone_weights={weights!r}: torchvision publishes no weights for {name!r}. Use "
            "resnet18/34/50 with a weights name, or pass the path of a state dict saved from this model."
        ) from None
    names = [w for w in enum.__members__]
    if weights not in names:
        raise ValueError(
            f"backbone_weights={weights!r} is neither a file nor one of {name}'s published weights {names}; "
            "pass a weights name such as 'IMAGENET1K_V1' or the path of a local state dict."
        )
    return enum[weights]


def weights_cache_path(weights: WeightsEnum) -> Path:
    """Where torchvision's weights API keeps (and looks for) the file of `weights`: the torch.hub cache.

    ``torch.hub.get_dir() / "checkpoints" / <file name of the URL>``, e.g.
    ``~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth``; ``TORCH_HOME`` or ``torch.hub.set_dir``
    moves it.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


@contextlib.contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _state_dict(name: str, weights: str | os.PathLike | WeightsEnum) -> tuple[dict[str, Tensor], str]:
    """The state dict `weights` designates and a description of where it came from."""
    enum = _published(name, weights) if isinstance(weights, (str, WeightsEnum)) else None
    if enum is None:
        path = Path(weights)  # type: ignore[arg-type]
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone_weights={str(weights)!r}: no such file. Pass the path of a torchvision {name} state "
                "dict, or a published weights name such as 'IMAGENET1K_V1'."
            )
        return torch.load(path, map_location="cpu", weights_only=True), str(path)
    cached = weights_cache_path(enum)
    try:
        with _network_timeout(_DOWNLOAD_TIMEOUT_S):
            state = enum.get_state_dict(progress=False, check_hash=False)
    except OSError as err:  # URLError, timeouts, DNS failures, an unwritable cache
        raise RuntimeError(
            f"backbone_weights={str(weights)!r}: could not fetch {enum} from {enum.url} ({err}), and it is not "
            f"in the torch.hub cache at {cached}. Without network access, download the file elsewhere and "
            f"either put it at {cached} (TORCH_HOME moves the cache) or pass its local path as "
            "backbone_weights (--model-arg backbone_weights=/path/to/file.pth)."
        ) from err
    return state, f"{enum} ({cached})"


def _load(net: resnet.ResNet, name: str, weights: str | os.PathLike | WeightsEnum) -> None:
    state, source = _state_dict(name, weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = net.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (needs {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:  # load_state_dict would raise a bare RuntimeError on these
        raise ValueError(
            f"{source} does not fit torchvision's {name}: shapes differ, e.g. {wrong[:3]}. It is another depth "
            f"or width; pass a state dict of {_saved_from(name)}."
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit torchvision's {name}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}. Pass a state dict of {_saved_from(name)}."
        )


def _saved_from(name: str) -> str:
    """Where a state dict that fits `name` comes from."""
    if name == "resnet10":  # not one of torchvision's depths: built here from its blocks
        return "this depth (implicitkit_det.pretrain.pretrain_backbone writes one)"
    return f"torchvision.models.{name}()"
