"""The neck: map every backbone level to the decoder's channels, with one GroupNorm shared by all levels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["ChannelMapper"]


class ChannelMapper(nn.Module):
    """Per level a ``k x k`` convolution (with bias), optionally ReLU, then a GroupNorm shared across levels.

        P_j = GN(act(conv_j(C_j)))

    Sharing the GroupNorm's scale and shift puts all levels on one footing, which the decoder relies on
    when it blends samples across levels. DEQDet uses ``k = 3`` with ReLU, AdaMixer ``k = 1`` without.
    There is no top-down pathway: the decoder's 3D sampling mixes the levels itself.

    The convolutions start Xavier-uniform with zero bias, as the reference configurations initialise them
    (``init="xavier_uniform"``); ``init="pytorch"`` keeps ``nn.Conv2d``'s own (Kaiming-uniform) start.

    Arguments:
        in_channels: channels of each backbone level.
        out_channels: the decoder's channels.
        kernel_size: 3 (DEQDet) or 1 (AdaMixer).
        relu: apply ReLU after each convolution.
        num_groups: of the shared GroupNorm.
        init: ``"xavier_uniform"`` (weights Xavier-uniform, bias 0) or ``"pytorch"`` (``nn.Conv2d``'s
            default).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        kernel_size: int = 3,
        relu: bool = True,
        num_groups: int = 32,
        init: Literal["xavier_uniform", "pytorch"] = "xavier_uniform",
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, kernel_size, padding=kernel_size // 2) for c in in_channels
        )
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        check_groups(num_groups, out_channels)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        if init not in ("xavier_uniform", "pytorch"):
            raise ValueError(f"init must be 'xavier_uniform' or 'pytorch', got {init!r}")
        self.init = init
        if init == "xavier_uniform":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform convolution weights, zero biases; the GroupNorm at scale 1, shift 0."""
        for conv in self.convs:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.norm.reset_parameters()

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Backbone levels ``[B, in_channels_j, H_j, W_j]`` -> ``[B, out_channels, H_j, W_j]``."""
        return [self.norm(self.act(conv(x))) for conv, x in zip(self.convs, features, strict=True)]


def check_groups(groups: int, channels: int) -> None:
    """A GroupNorm splits the channels into equal groups: refuse a count that does not divide them."""
    if channels % groups:
        divisors = [d for d in (32, 16, 8, 4, 2, 1) if channels % d == 0]
        raise ValueError(
            f"ModelConfig.gn_groups={groups} does not divide dim={channels} (GroupNorm splits the channels into "
            f"equal groups); give a divisor of {channels}, such as {divisors[0]}"
        )
