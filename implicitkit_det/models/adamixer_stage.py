"""One decoder layer of AdaMixer, the layer DEQDet iterates: attention, 3D sampling, mixing, FFN, heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .attention import IoFSelfAttention
from .boxes import xyzr_to_xyxy
from .mixing import AdaptiveMixing
from .queries import QueryState
from .sampling import AdaptiveSampling3D

__all__ = ["AdaMixerStage", "refine_boxes"]


def refine_boxes(xyzr: Tensor, delta: Tensor) -> Tensor:
    """Move boxes by predicted deltas: the centre in units of the box's scale, scale and aspect additively.

    x += dx 2^z,   y += dy 2^z,   z += dz,   r += dr
    """
    step = 2.0 ** xyzr[..., 2:3]
    return torch.cat([xyzr[..., :2] + delta[..., :2] * step, xyzr[..., 2:] + delta[..., 2:]], dim=-1)


def _head(dim: int, out: int) -> nn.Sequential:
    """``Linear + LN + ReLU`` then ``Linear(dim, out)``."""
    return nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True), nn.Linear(dim, out))


class AdaMixerStage(nn.Module):
    """Refine every query's content and box once, reading the image through its box.

    With the box input detached (``b = sg(xyzr)``: a layer learns to refine the box it is given, and no
    gradient flows back through earlier boxes):

        q <- IoFSelfAttention(q, b)                                   (residual + LN inside)
        q <- AdaptiveMixing(AdaptiveSampling3D(q, b, features), q)    (residual + LN inside)
        q <- LN(q + W_2 ReLU(W_1 q))                                  (FFN dim -> ffn_dim -> dim)
        b <- refine_boxes(b, reg_head(q))

    and :meth:`predict` reads class logits (``cls_head``) and normalised boxes from the result. As a map
    ``state -> state`` with the features fixed, the layer is a fixed-point cell for :mod:`implicitkit`.

    **Initialisation.** Linear weights Xavier-uniform, biases PyTorch's default (zero in the attention),
    except: the classifier's
    bias is ``-log((1 - 0.01) / 0.01)`` (every class starts at probability 0.01, so the many negatives do
    not swamp the focal loss at first); the box regressor starts at 0 (the first update keeps the box); the
    sampling offsets and the mixing generator as their classes say; attention ``tau ~ U(0, 4)``.

    **Parameter count** (``dim`` 256, 8 heads, ``G`` 4, ``P_out`` 128, FFN 2048, 80 classes), everything
    the layer owns, heads included:

    | part | parameters |
    |---|---|
    | attention: q/k/v/out projections 263,168, LN 512, tau 8 | 263,688 |
    | sampling offsets ``Linear(256, 12 P)`` | 257 * 12 P |
    | mixing generator ``Linear(256, 4 (64^2 + 128 P))`` | 257 * 4 (4096 + 128 P) |
    | mixing output ``Linear(32768, 256)`` and LN | 8,389,376 |
    | FFN and LN | 1,051,392 |
    | cls head: ``Linear(256, 256)`` *with* bias, LN, ``Linear(256, 80)`` | 86,864 |
    | reg head: ``Linear(256, 256)`` *with* bias, LN, ``Linear(256, 4)`` | 67,332 |

    That is 18,378,716 for ``P = 32`` (one AdaMixer stage) and 22,688,092 for ``P = 64`` (one DEQDet
    layer). The hidden layers of both heads carry a bias: without it the count is 512 short.

    Arguments:
        num_classes: classes of the sigmoid classifier (no background class).
        dim: content channels (also the features' channels).
        num_heads: attention heads.
        num_points: ``P``, sampling points per group.
        out_points: ``P_out``, points after spatial mixing.
        num_groups: ``G``, channel groups for sampling and mixing.
        ffn_dim: hidden width of the FFN.
        strides: of the feature levels the layer reads.
        prior_prob: the classifier's starting probability.
    """

    #: A state of ``r B`` rows (``r`` blocks of the batch stacked, as DEQDet's stacked branches) may come with
    #: the ``B`` images' features: row ``j B + i`` reads image ``i``, and the maps are not copied ``r`` times.
    reads_stacked_rows = True

    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        num_heads: int = 8,
        num_points: int = 32,
        out_points: int = 128,
        num_groups: int = 4,
        ffn_dim: int = 2048,
        strides: Sequence[int] = (4, 8, 16, 32),
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.prior_prob = prior_prob
        self.attention = IoFSelfAttention(dim, num_heads)
        self.sampling = AdaptiveSampling3D(dim, num_points, num_groups, strides)
        self.mixing = AdaptiveMixing(dim, dim, num_points, out_points, num_groups)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.cls_head = _head(dim, num_classes)
        self.reg_head = _head(dim, 4)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in (self.ffn, self.cls_head, self.reg_head):
            for layer in module:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
                    nn.init.xavier_uniform_(layer.weight)
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        nn.init.zeros_(self.reg_head[-1].weight)
        nn.init.zeros_(self.reg_head[-1].bias)
        self.attention.reset_parameters()
        self.sampling.reset_parameters()
        self.mixing.reset_parameters()

    def forward(
        self, state: QueryState, features: Sequence[Tensor], image_sizes: Tensor | None = None
    ) -> QueryState:
        """One refinement: ``state`` (content [B, N, dim], xyzr [B, N, 4]) -> the next state.

        Arguments:
            state: the queries.
            features: the pyramid levels ``[B, dim, H_j, W_j]``, in the order of ``strides`` (of the ``B``
                images of a stacked state, see ``reads_stacked_rows``).
            image_sizes: ``[B, 2]`` real ``(h, w)``; unused here, part of the cell signature the detectors
                share (``cell(state, features, image_sizes)``).
        """
        xyzr = state["xyzr"].detach()
        content = self.attention(state["content"], xyzr)
        content = self.mixing(self.sampling(content, xyzr, features), content)
        content = self.ffn_norm(content + self.ffn(content))
        return {"content": content, "xyzr": refine_boxes(xyzr, self.reg_head(content))}

    def predict(self, state: QueryState, image_sizes: Tensor) -> dict[str, Tensor]:
        """The criterion's view of a state this layer produced.

        Returns:
            ``pred_logits`` [B, N, classes] and ``pred_boxes`` [B, N, 4], xyxy divided by each
            image's real ``(w, h, w, h)``.
        """
        h, w = image_sizes.to(state["xyzr"]).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None]
        return {
            "pred_logits": self.cls_head(state["content"]),
            "pred_boxes": xyzr_to_xyxy(state["xyzr"]) / scale,
        }
