"""One Sparse R-CNN stage (mmdetection's ``DIIHead`` with its RoI extractor): the layer DEQ Sparse R-CNN iterates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .delta_coder import DELTA_STDS, decode_deltas
from .dynamic_conv import DynamicInteraction
from .proposals import ProposalState
from .roi import MultiLevelRoIAlign

__all__ = ["SparseRCNNStage"]


def _fcs(dim: int, count: int) -> list[nn.Module]:
    """``count`` x (``Linear`` without bias, LN, ReLU)."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True)]
    return layers


class SparseRCNNStage(nn.Module):
    """Refine every proposal's feature and box once, reading the image through its box.

    With ``b`` the input box (detached when `detach_boxes`, see below) and ``R`` its RoIAlign features:

        R <- MultiLevelRoIAlign(features, b)                    (S x S, level by box scale)
        q <- LN(q + MHA(q, q, q))                                (8 heads, no positional encoding)
        q <- LN(q + DynamicInteraction(q, R))
        q <- LN(q + W_2 ReLU(W_1 q))                             (FFN dim -> ffn_dim -> dim)
        b <- decode_deltas(b, reg_head(q), stds (0.5, 0.5, 1, 1))

    and :meth:`predict` reads class logits (``cls_head``) and normalised boxes from the result. As a map
    ``state -> state`` with the features fixed, the stage is a fixed-point cell for :mod:`implicitkit`,
    with the same interface as :class:`~.adamixer_stage.AdaMixerStage`.

    **Boxes between stages.** Sparse R-CNN detaches each stage's boxes before the next stage, so a stage's
    box is trained only through its own regression; the first stage's input, the learned proposal boxes,
    is not detached, so those are trained through the first stage's decoding. `detach_boxes` is False for
    the first stage (and DEQ Sparse R-CNN's ``G``) and True for the others (and ``F``).

    **Initialisation** (``DIIHead.init_weights``): every parameter with more than one dimension is
    Xavier-uniform; biases and LayerNorms keep PyTorch's defaults (the attention's biases 0), except the
    classifier's bias ``-log((1 - 0.01) / 0.01)`` (prior 0.01) and the regressor's bias 0.

    **Parameter count** (``dim`` 256, 8 heads, hidden 64, ``S`` 7, FFN 2048, 80 classes, 1 cls and 3 reg
    layers):

    | part | parameters |
    |---|---|
    | attention: in/out projections 263,168, LN 512 | 263,680 |
    | dynamic interaction (see :class:`~.dynamic_conv.DynamicInteraction`) and LN | 11,634,560 |
    | FFN and LN | 1,051,392 |
    | cls head: 1 x (``Linear(256, 256)`` without bias, LN), ``Linear(256, 80)`` | 86,608 |
    | reg head: 3 x (``Linear(256, 256)`` without bias, LN), ``Linear(256, 4)`` | 199,172 |

    That is 13,235,412 per stage.

    Arguments:
        num_classes: classes of the sigmoid classifier (no background class).
        dim: proposal feature channels (also the features' channels).
        num_heads: attention heads.
        hidden_dim: the dynamic interaction's ``c``.
        roi_size: ``S``.
        ffn_dim: hidden width of the FFN.
        num_cls_fcs, num_reg_fcs: hidden layers of the heads.
        strides: of the feature levels the stage reads.
        detach_boxes: detach the input boxes (see above).
        clip_boxes: clip the decoded boxes to the image (mmdetection's Sparse R-CNN does not).
        stds: the delta coder's scales.
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
        hidden_dim: int = 64,
        roi_size: int = 7,
        ffn_dim: int = 2048,
        num_cls_fcs: int = 1,
        num_reg_fcs: int = 3,
        strides: Sequence[int] = (4, 8, 16, 32),
        *,
        detach_boxes: bool = True,
        clip_boxes: bool = False,
        stds: Sequence[float] = DELTA_STDS,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.detach_boxes, self.clip_boxes = detach_boxes, clip_boxes
        self.stds, self.prior_prob = tuple(stds), prior_prob
        self.roi_align = MultiLevelRoIAlign(strides, roi_size)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.attention_norm = nn.LayerNorm(dim)
        self.interaction = DynamicInteraction(dim, hidden_dim, roi_size)
        self.interaction_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.cls_head = nn.Sequential(*_fcs(dim, num_cls_fcs), nn.Linear(dim, num_classes))
        self.reg_head = nn.Sequential(*_fcs(dim, num_reg_fcs), nn.Linear(dim, 4))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)):
                module.reset_parameters()
        nn.init.zeros_(self.attention.in_proj_bias)
        nn.init.zeros_(self.attention.out_proj.bias)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - self.prior_prob) / self.prior_prob))
        nn.init.zeros_(self.reg_head[-1].bias)

    def forward(self, state: ProposalState, features: Sequence[Tensor], image_sizes: Tensor) -> ProposalState:
        """One refinement: ``state`` (content [B, N, dim], xyxy [B, N, 4]) -> the next state.

        Arguments:
            state: the proposals.
            features: the pyramid levels ``[B, dim, H_j, W_j]``, in the order of ``strides`` (of the ``B``
                images of a stacked state, see ``reads_stacked_rows``).
            image_sizes: ``[B, 2]`` real ``(h, w)``, for clipping when `clip_boxes`.
        """
        boxes = state["xyxy"].detach() if self.detach_boxes else state["xyxy"]
        content = state["content"]
        batch, n, dim = content.shape
        rois = self.roi_align(features, boxes)  # [B N, dim, S, S]
        content = self.attention_norm(
            content + self.attention(content, content, content, need_weights=False)[0]
        )
        interaction = self.interaction(content.reshape(batch * n, dim), rois).view(batch, n, dim)
        content = self.interaction_norm(content + interaction)
        content = self.ffn_norm(content + self.ffn(content))
        sizes = image_sizes if self.clip_boxes else None
        return {"content": content, "xyxy": decode_deltas(boxes, self.reg_head(content), self.stds, sizes)}

    def predict(self, state: ProposalState, image_sizes: Tensor) -> dict[str, Tensor]:
        """The criterion's view of a state this stage produced.

        Returns:
            ``pred_logits`` [B, N, classes] and ``pred_boxes`` [B, N, 4], xyxy divided by each
            image's real ``(w, h, w, h)``.
        """
        h, w = image_sizes.to(state["xyxy"]).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1)[:, None]
        return {"pred_logits": self.cls_head(state["content"]), "pred_boxes": state["xyxy"] / scale}

    def extra_repr(self) -> str:
        return f"detach_boxes={self.detach_boxes}, clip_boxes={self.clip_boxes}, stds={self.stds}"
