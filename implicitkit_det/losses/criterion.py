"""The set-prediction loss: Hungarian matching, then focal, L1 and GIoU losses on the matched pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from ..collectives import all_reduce_mean
from .matcher import HungarianMatcher

__all__ = ["SetCriterion"]


class SetCriterion(nn.Module):
    """DETR-style set loss with DEQDet's weights: focal x2, L1 x5, GIoU x2.

    Given a one-to-one match ``sigma`` of predictions to targets, with ``P`` the number of targets in the
    batch averaged over processes (at least 1):

        focal = sum_{i, c} FL(logit_ic, y_ic) / P      y_ic = 1 iff prediction i is matched to a target of class c
        l1    = sum_{(i, j) in sigma} ||b_i - t_j||_1 / P          (normalised xyxy boxes)
        giou  = sum_{(i, j) in sigma} (1 - GIoU(b_i, t_j)) / P
        loss  = w_focal focal + w_l1 l1 + w_giou giou

    where ``FL`` is the sigmoid focal loss (``alpha`` 0.25, ``gamma`` 2) over every prediction and class:
    unmatched predictions are negatives for all classes.

    **One-to-many matching** (``one_to_many = k > 1``, H-DETR's hybrid matching applied to every query): each
    image's targets are repeated ``k`` times before the match, so up to ``k`` predictions learn each object
    and ``P`` counts the repeated targets. More positives per step speed up learning; the duplicates it
    trains are then left for NMS at inference (``PostProcess(nms_iou=...)``).

    Arguments:
        matcher: the matcher used when no ``indices`` are given; default :class:`HungarianMatcher` with
            DEQDet's costs.
        weight_focal, weight_l1, weight_giou: the loss weights (2.0, 5.0, 2.0).
        focal_alpha, focal_gamma: of the focal loss.
        one_to_many: ``k``, the predictions matched to each target (1: the one-to-one set loss).
    """

    def __init__(
        self,
        matcher: nn.Module | None = None,
        weight_focal: float = 2.0,
        weight_l1: float = 5.0,
        weight_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        one_to_many: int = 1,
    ) -> None:
        super().__init__()
        if one_to_many < 1:
            raise ValueError(
                f"one_to_many must be a positive number of matches per target, got {one_to_many}"
            )
        self.one_to_many = one_to_many
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"focal": weight_focal, "l1": weight_l1, "giou": weight_giou}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def num_positives(targets: Sequence[Mapping[str, Any]], device: torch.device) -> Tensor:
        """The loss normaliser ``P``: the batch's target count, averaged over processes, at least 1."""
        n = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return all_reduce_mean(n).clamp(min=1.0)

    def forward(
        self,
        outputs: Mapping[str, Tensor],
        targets: Sequence[Mapping[str, Any]],
        indices: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """The losses of one set of predictions.

        Arguments:
            outputs: ``pred_logits`` [B, N, C] and ``pred_boxes`` [B, N, 4] (normalised xyxy).
            targets: per image ``labels`` [M] and ``boxes_normalized`` [M, 4].
            indices: a precomputed match (as the matcher returns); matched here when None.

        Returns:
            ``focal``, ``l1``, ``giou`` (unweighted), ``loss_focal``, ``loss_l1``, ``loss_giou``
            (weighted) and ``loss``, their sum: scalar tensors.
        """
        given = None if indices is None else {"": indices}
        return self.branch_losses({"": outputs}, targets, given)[""]

    def branch_losses(
        self,
        branches: Mapping[str, Mapping[str, Tensor]],
        targets: Sequence[Mapping[str, Any]],
        indices: Mapping[str, Sequence[tuple[Tensor, Tensor]]] | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """The losses of several sets of predictions of the same images (a detector's supervised branches),
        computed as one batch: the ``K`` branches are stacked along the batch, matched with one cost matrix,
        and their focal, L1 and GIoU terms are each one reduction, split per branch by a segment sum. Equal
        to :meth:`forward` branch by branch, with ``K`` times fewer operator calls.

        Arguments:
            branches: name -> outputs, as :meth:`forward` takes them (the same batch of images).
            targets: per image, as for :meth:`forward`.
            indices: name -> a precomputed match; matched here when None.

        Returns:
            name -> :meth:`forward`'s dict for that branch.
        """
        names = list(branches)
        shapes = {tuple(branches[n]["pred_logits"].shape) for n in names}
        if len(shapes) > 1:  # branches of other query counts (an auxiliary set): stacked shape by shape
            out: dict[str, dict[str, Tensor]] = {}
            for shape in shapes:
                group = [n for n in names if tuple(branches[n]["pred_logits"].shape) == shape]
                given = None if indices is None else {n: indices[n] for n in group}
                out.update(self.branch_losses({n: branches[n] for n in group}, targets, given))
            return {n: out[n] for n in names}
        logits = _stacked([branches[n]["pred_logits"] for n in names])
        boxes = _stacked([branches[n]["pred_boxes"] for n in names])
        targets = self._repeated(targets)
        every = list(targets) * len(names)  # the targets of each image of the stacked batch
        if indices is None:
            try:
                match = self.matcher({"pred_logits": logits, "pred_boxes": boxes}, every)
            except FloatingPointError as err:
                raise _in_branch(err, names, logits, boxes, targets) from err
        else:
            match = [pair for n in names for pair in indices[n]]
        num_pos = self.num_positives(targets, logits.device)
        batch_idx, pred_idx, labels, tgt_boxes = _matched_pairs(match, every, logits.device)
        tgt_boxes = tgt_boxes.to(boxes)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, pred_idx, labels] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        focal = focal.view(len(names), -1).sum(dim=1)
        matched = boxes[batch_idx, pred_idx]
        # With no targets the sums below are zero but still depend on `boxes`, so every parameter gets a
        # (zero) gradient, which DistributedDataParallel expects.
        branch_of = torch.div(batch_idx, len(targets), rounding_mode="floor")
        per_pair = torch.stack(
            [(matched - tgt_boxes).abs().sum(dim=-1), generalized_box_iou_loss(matched, tgt_boxes)], dim=-1
        )
        l1, giou = per_pair.new_zeros(len(names), 2).index_add(0, branch_of, per_pair).unbind(-1)
        terms = torch.stack([focal, l1, giou], dim=-1) / num_pos  # [K, 3]
        weighted = terms * terms.new_tensor([self.weights[k] for k in _TERMS])
        total = weighted.sum(dim=-1)
        out = {}
        for i, name in enumerate(names):
            raw, scaled = terms[i].unbind(), weighted[i].unbind()
            out[name] = {
                **dict(zip(_TERMS, raw, strict=True)),
                **{f"loss_{k}": v for k, v in zip(_TERMS, scaled, strict=True)},
                "loss": total[i],
            }
        return out

    def _repeated(self, targets: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
        """The targets as matched: each image's repeated ``one_to_many`` times."""
        k = self.one_to_many
        if k == 1:
            return targets
        return [
            {**t, "labels": t["labels"].repeat(k), "boxes_normalized": t["boxes_normalized"].repeat(k, 1)}
            for t in targets
        ]


_TERMS = ("focal", "l1", "giou")


def _in_branch(
    err: FloatingPointError,
    names: list[str],
    logits: Tensor,
    boxes: Tensor,
    targets: Sequence[Mapping[str, Any]],
) -> FloatingPointError:
    """The matcher's error on the stacked batch, said of the branch and the image (row ``k B + b`` is image
    ``b`` of branch ``k``), where its own message counts the stacked rows."""
    finite = torch.isfinite(logits).flatten(1).all(dim=1) & torch.isfinite(boxes).flatten(1).all(dim=1)
    if bool(finite.all()) or len(names) == 1:
        return err
    row = int((~finite).nonzero()[0])
    branch, image = names[row // len(targets)], row % len(targets)
    return FloatingPointError(
        f"branch {branch}, image {image} (image_id {targets[image].get('image_id')}): its predictions are NaN or "
        "infinite (the matcher found a cost that is). The model has likely diverged: lower the learning rate "
        "or check the inputs."
    )


def _stacked(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _matched_pairs(
    indices: Sequence[tuple[Tensor, Tensor]], targets: Sequence[Mapping[str, Any]], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Image index, prediction index, target label and target box of every matched pair of a batch."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
    pred_idx = torch.cat([src for src, _ in indices]).to(device)
    pairs = list(zip(targets, indices, strict=True))
    labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in pairs]).to(device)
    boxes = torch.cat([t["boxes_normalized"][tgt.to(t["boxes_normalized"].device)] for t, (_, tgt) in pairs])
    return batch_idx, pred_idx, labels, boxes
