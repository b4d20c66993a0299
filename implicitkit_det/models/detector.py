"""What every query-based detector here shares: backbone -> neck -> decoder, set losses, top-k detections."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import implicitkit as ik

from ..evaluation import PostProcess
from ..losses import SetCriterion
from .queries import InitialQueries

__all__ = ["Outputs", "QueryDetector"]

Outputs = dict[str, Tensor]  # {"pred_logits": [B, N, C], "pred_boxes": [B, N, 4] normalised xyxy}


class QueryDetector(nn.Module, ABC):
    """A detector in torchvision's convention, whose decoder refines ``N`` queries into ``N`` detections.

    - ``model.train(); model(images, targets)`` returns a dict of losses: every supervised branch's
      :class:`~implicitkit_det.losses.SetCriterion` terms prefixed with the branch name (each branch has
      its own Hungarian match), and ``loss``, the sum of the branches' ``loss``, to back-propagate.
    - ``model.eval(); model(images)`` returns per image ``{"boxes", "scores", "labels"}``: the top
      ``num_select`` of the ``N x C`` sigmoid scores, no NMS, boxes in pixels of the original image when the
      targets give ``orig_size``, else of the input image.
    - :meth:`predict` returns the raw outputs ``{"pred_logits", "pred_boxes"}`` for evaluation loops that
      post-process themselves.
    - :meth:`forward_backward` back-propagates branch after branch, so that memory holds one branch's graph
      at a time (see its docstring).

    Inputs follow :func:`~implicitkit_det.data.collate_detection`: ``images`` ``[B, 3, H, W]`` padded at the
    bottom and right, ``mask`` ``[B, H, W]`` True on padding, ``targets`` with ``labels``,
    ``boxes_normalized``, ``size`` and ``orig_size``. Boxes are normalised by each image's real
    (unpadded) size, taken from ``targets[i]["size"]``, else from ``mask``, else the padded size.

    Subclasses provide :meth:`training_branches` and :meth:`inference_outputs`.

    **Arguments**
    - `backbone`: images -> list of levels (strides 4, 8, 16, 32).
    - `neck`: levels -> levels of the decoder's channels.
    - `queries`: the initial :class:`~.queries.InitialQueries`.
    - `criterion`: default :class:`~implicitkit_det.losses.SetCriterion` (focal 2, L1 5, GIoU 2).
    - `num_select`: detections per image at inference.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        queries: InitialQueries,
        *,
        criterion: SetCriterion | None = None,
        num_select: int = 100,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.queries = queries
        self.criterion = criterion if criterion is not None else SetCriterion()
        self.postprocess = PostProcess(num_select)

    # -- what a detector provides --------------------------------------------------------------------
    @abstractmethod
    def training_branches(
        self, features: Sequence[Tensor], image_sizes: Tensor
    ) -> Iterator[dict[str, Outputs]]:
        """The supervised outputs, in groups whose graphs are independent apart from ``features``.

        Each group maps branch names to outputs. Groups are produced lazily, so :meth:`forward_backward`
        can free one group's graph before the next is built.
        """

    @abstractmethod
    def inference_outputs(self, features: Sequence[Tensor], image_sizes: Tensor) -> Outputs:
        """The final predictions."""

    # -- shared machinery ----------------------------------------------------------------------------
    def features(self, images: Tensor) -> list[Tensor]:
        """The neck's pyramid ``[B, dim, H / s_j, W / s_j]``, strides 4, 8, 16, 32."""
        return self.neck(self.backbone(images))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by part: ``backbone``, ``neck``, ``queries`` and ``decoder`` (all the rest).

        For optimisers that treat the decoder differently (DEQDet and AdaMixer train it with 4x the
        learning rate and 10x the weight decay).
        """
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "neck": [], "queries": [], "decoder": []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                part = name.split(".", 1)[0]
                groups[part if part in groups else "decoder"].append(param)
        return groups

    @staticmethod
    def image_sizes(
        images: Tensor, targets: Sequence[Mapping[str, Any]] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Each image's real ``(h, w)`` as a float ``[B, 2]``: from ``targets[i]["size"]``, else ``mask``, else
        the padded size."""
        if targets is not None and all("size" in t for t in targets):
            sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets])
        elif mask is not None:
            valid = ~mask
            sizes = torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=-1)
        else:
            sizes = torch.tensor(images.shape[-2:]).expand(images.shape[0], 2)
        return sizes.to(device=images.device, dtype=images.dtype)

    def forward(
        self,
        images: Tensor,
        targets: Sequence[Mapping[str, Any]] | None = None,
        *,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Losses in training mode, detections in eval mode (see the class docstring)."""
        if isinstance(targets, Tensor):
            raise TypeError("The second argument is the list of targets; pass the padding mask as mask=... .")
        sizes = self.image_sizes(images, targets, mask)
        features = self.features(images)
        if self.training:
            targets = self._require_targets(targets, images)
            outputs: dict[str, Outputs] = {}
            for group in self.training_branches(features, sizes):
                outputs.update(group)
            return self.losses(outputs, targets)
        outputs_final = self.inference_outputs(features, sizes)
        if targets is not None and all("orig_size" in t for t in targets):
            out_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in targets]).to(sizes)
        else:
            out_sizes = sizes
        return self.postprocess(outputs_final, out_sizes)

    def predict(
        self, images: Tensor, *, mask: Tensor | None = None, image_sizes: Tensor | None = None
    ) -> Outputs:
        """The final raw outputs ``{"pred_logits" [B, N, C], "pred_boxes" [B, N, 4]}`` in any mode.

        **Arguments**
        - `images`, `mask`: as for :meth:`forward`.
        - `image_sizes`: ``[B, 2]`` real ``(h, w)``; default from ``mask``.
        """
        sizes = self.image_sizes(images, mask=mask) if image_sizes is None else image_sizes.to(images)
        return self.inference_outputs(self.features(images), sizes)

    def losses(
        self, outputs: Mapping[str, Outputs], targets: Sequence[Mapping[str, Any]]
    ) -> dict[str, Tensor]:
        """Each branch's criterion terms as ``"{branch}_{term}"`` and their total ``loss`` (equal weights)."""
        result: dict[str, Tensor] = {}
        total = None
        for name, branch in outputs.items():
            terms = self.criterion(branch, targets)
            result.update({f"{name}_{k}": v for k, v in terms.items()})
            total = terms["loss"] if total is None else total + terms["loss"]
        assert total is not None, "a detector must supervise at least one branch"
        result["loss"] = total
        return result

    def forward_backward(
        self,
        images: Tensor,
        targets: Sequence[Mapping[str, Any]],
        *,
        mask: Tensor | None = None,
        loss_scale: float = 1.0,
    ) -> dict[str, Tensor]:
        """Compute the training losses and back-propagate them, one branch group at a time.

        The gradients equal those of ``(loss_scale * model(images, targets)["loss"]).backward()``, but each
        group's graph is freed as soon as its loss is back-propagated into leaf copies of the features
        (:class:`implicitkit.SharedInputs`); one final backward carries the summed feature gradient through
        the neck and backbone. Peak memory then holds one group's graph instead of all of them, which for
        DEQDet's path supervision is most of the decoder's memory.

        Use it in place of ``loss.backward()`` in a single-process loop (under ``DistributedDataParallel``,
        whose gradient hooks expect one backward per forward, use the plain forward).

        **Arguments**
        - `images`, `targets`, `mask`: as for :meth:`forward`.
        - `loss_scale`: multiplies every loss before its backward (e.g. a ``GradScaler``'s scale).

        **Returns** the same dict as :meth:`forward`, detached.
        """
        if not self.training:
            raise RuntimeError("forward_backward trains: call model.train() first.")
        targets = self._require_targets(targets, images)
        sizes = self.image_sizes(images, targets, mask)
        shared = ik.SharedInputs(self.features(images))
        (features,) = shared.inputs
        result: dict[str, Tensor] = {}
        total = torch.zeros((), device=images.device)
        for group in self.training_branches(features, sizes):
            losses = self.losses(group, targets)
            (loss_scale * losses["loss"]).backward()
            total = total + losses.pop("loss").detach()
            result.update({k: v.detach() for k, v in losses.items()})
        shared.backward()
        result["loss"] = total
        return result

    @staticmethod
    def _require_targets(
        targets: Sequence[Mapping[str, Any]] | None, images: Tensor
    ) -> Sequence[Mapping[str, Any]]:
        if targets is None:
            raise ValueError(
                "In training mode the model needs targets: model(images, targets); call model.eval() to detect."
            )
        if len(targets) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(targets)} targets")
        return targets
