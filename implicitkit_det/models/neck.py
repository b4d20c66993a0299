"""The neck: map every backbone level to the decoder's channels, with one GroupNorm shared by all levels."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ChannelMapper"]


class ChannelMapper(nn.Module):
    """Per level a ``k x k`` convolution (with bias), optionally ReLU, then a GroupNorm shared across levels.

        P_j = GN(act(conv_j(C_j)))

    Sharing the GroupNorm's scale and shift puts all levels on one footing, which the decoder relies on
    when it blends samples across levels. DEQDet uses ``k = 3`` with ReLU, AdaMixer ``k = 1`` without.
    There is no top-down pathway: the decoder's 3D sampling mixes the levels itself.

    **Arguments**
    - `in_channels`: channels of each backbone level.
    - `out_channels`: the decoder's channels.
    - `kernel_size`: 3 (DEQDet) or 1 (AdaMixer).
    - `relu`: apply ReLU after each convolution.
    - `num_groups`: of the shared GroupNorm.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        kernel_size: int = 3,
        relu: bool = True,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, kernel_size, padding=kernel_size // 2) for c in in_channels
        )
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Backbone levels ``[B, in_channels_j, H_j, W_j]`` -> ``[B, out_channels, H_j, W_j]``."""
        return [self.norm(self.act(conv(x))) for conv, x in zip(self.convs, features, strict=True)]
