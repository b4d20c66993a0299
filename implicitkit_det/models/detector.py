"""What every query-based detector here shares: backbone -> neck -> decoder, set losses, top-k detections."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

import implicitkit as ik

from ..evaluation import PostProcess
from ..losses import SetCriterion
from .queries import InitialQueries

__all__ = ["BranchwiseLosses", "Outputs", "QueryDetector"]

Outputs = dict[str, Tensor]  # {"pred_logits": [B, N, C], "pred_boxes": [B, N, 4] normalised xyxy}


@dataclass
class BranchwiseLosses:
    """What a branch-wise training call returns (``model(images, targets, branchwise=True)``).

    A dataclass, so that ``DistributedDataParallel`` finds the ``pending`` tensor in the module's output.

    Attributes:
        losses: every branch's criterion terms and the total ``loss``, detached: the same numbers as the
            plain call's dict (they are back-propagated already).
        pending: a scalar of value 0 whose ``backward()`` delivers the gradients gathered so far, the one
            backward left to run (and the one DDP synchronises).
    """

    losses: dict[str, Tensor]
    pending: Tensor


@runtime_checkable
class RefinementStage(Protocol):
    """A decoder layer the detectors refine queries with (:class:`~.adamixer_stage.AdaMixerStage`,
    :class:`~.sparse_rcnn_stage.SparseRCNNStage`, or a new detector's own): ``stage(state, features,
    image_sizes)`` returns the next query state, ``stage.predict(state, image_sizes)`` its outputs
    ``{"pred_logits", "pred_boxes"}``. A class attribute ``reads_stacked_rows = True`` says that the stage
    also takes a state of ``r B`` rows (``r`` blocks of the batch, row ``j B + i`` on image ``i``) with the
    ``B`` images' own features."""

    def __call__(self, state: Any, features: Sequence[Tensor], image_sizes: Tensor) -> Any: ...

    def predict(self, state: Any, image_sizes: Tensor) -> Outputs: ...


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
    - ``model(images, targets, branchwise=True)`` back-propagates branch group after branch group as soon
      as each loss exists, so that memory holds one group's graph at a time; the returned dict holds the
      losses, detached, and the one backward left to run, as a :class:`BranchwiseLosses` (see :meth:`forward`).
      :meth:`forward_backward` runs that backward too.

    Inputs follow :func:`~implicitkit_det.data.collate_detection`: ``images`` ``[B, 3, H, W]`` padded at the
    bottom and right, ``mask`` ``[B, H, W]`` True on padding, ``targets`` with ``labels``,
    ``boxes_normalized``, ``size`` and ``orig_size``. Boxes are normalised by each image's real
    (unpadded) size, taken from ``targets[i]["size"]``, else from ``mask``, else the padded size. The mask
    gives those sizes only: the backbone and the neck see the padded pixels (a normalisation gives them a
    value, a convolution carries it inwards, the neck's GroupNorm counts them), so an image's detections
    depend on how much its batch pads it, as in other CNN detectors. On a digits model trained 3 epochs, 8
    val images in one batch against each alone: boxes moved by up to 33 px, scores by up to 0.21, AP 0.165
    against 0.158. Evaluation therefore forms its batches the same way at any number of processes.

    Subclasses provide :meth:`training_branches` and :meth:`inference_outputs`.

    Arguments:
        backbone: images -> list of levels (strides 4, 8, 16, 32).
        neck: levels -> levels of the decoder's channels.
        queries: the initial :class:`~.queries.InitialQueries`.
        criterion: default :class:`~implicitkit_det.losses.SetCriterion` (focal 2, L1 5, GIoU 2).
        num_select: detections per image at inference.
        nms_iou: class-wise NMS at inference above this IoU (see
            :class:`~implicitkit_det.evaluation.PostProcess`); None, the published detectors' choice, for none.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        queries: InitialQueries,
        *,
        criterion: SetCriterion | None = None,
        num_select: int = 100,
        nms_iou: float | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.queries = queries
        self.criterion = criterion if criterion is not None else SetCriterion()
        self.postprocess = PostProcess(num_select, nms_iou)

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

    # -- what the engine asks of every detector -------------------------------------------------------
    #: Under an enabled ``torch.autocast``, whether the decoder runs in low precision too. False (the default)
    #: keeps autocast to the backbone and the neck, where the convolutions' arithmetic is the cost, and runs
    #: the decoder (small per-query ops, box arithmetic, the losses) in float32 on float32 features.
    low_precision_decoder: bool = False
    #: Per-image refinement steps of the last inference (``[B]``), for detectors that count them.
    last_steps: Tensor | None = None

    def refinement_layers(self) -> Iterator[nn.Module]:
        """The layers applied at test, one per refinement step, without end (each ``layer(state, features,
        sizes)`` with ``layer.predict(state, sizes)``): what the refinement curve scores step by step."""
        raise TypeError(
            f"the refinement curve needs a DEQ detector (init layer G, refinement layer F) or a stack of decoder "
            f"stages (AdaMixer, Sparse R-CNN); {type(self).__name__} does not say its refinement layers"
        )

    @property
    def training_depth(self) -> int | None:
        """The step of :meth:`refinement_layers` the detector was trained to; None when it has none."""
        return None

    @property
    def test_settings(self) -> dict[str, Any]:
        """The settings of inference that can change after training (a DEQ's test-time steps); none here."""
        return {}

    def configure_test(self, **settings: Any) -> None:
        """Change :attr:`test_settings` (``test_steps=``, ...), refusing names the detector does not have."""
        unknown = sorted(set(settings) - set(self.test_settings))
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no test-time setting {unknown}; it has {sorted(self.test_settings)}"
            )
        for name, value in settings.items():
            setattr(self, name, value)

    # -- shared machinery ----------------------------------------------------------------------------
    def features(self, images: Tensor) -> list[Tensor]:
        """The neck's pyramid ``[B, dim, H / s_j, W / s_j]``, strides 4, 8, 16, 32."""
        return self.neck(self.backbone(images))

    def parameters_by_part(self) -> dict[str, list[nn.Parameter]]:
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
        the padded size. Given both, they must agree (a size given as ``(w, h)`` would be read silently)."""
        from_mask = None
        if mask is not None:
            _check_mask(mask, images)
            valid = ~mask
            from_mask = torch.stack([valid.any(dim=2).sum(dim=1), valid.any(dim=1).sum(dim=1)], dim=-1)
        if targets is not None and all("size" in t for t in targets):
            sizes = torch.stack([torch.as_tensor(t["size"]) for t in targets]).to(images.device)
            _check_sizes(sizes, from_mask, images)
        elif from_mask is not None:
            sizes = from_mask
        else:
            sizes = torch.tensor(images.shape[-2:]).expand(images.shape[0], 2)
        return sizes.to(device=images.device, dtype=images.dtype)

    def forward(
        self,
        images: Tensor,
        targets: Sequence[Mapping[str, Any]] | None = None,
        *,
        mask: Tensor | None = None,
        branchwise: bool = False,
        loss_scale: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]] | BranchwiseLosses:
        """Losses in training mode, detections in eval mode (see the class docstring).

        **Branch-wise training** (``branchwise=True``, training mode only): each group of
        :meth:`training_branches` is back-propagated as soon as its losses exist, into leaf copies of the
        features, and its graph is freed before the next group is built. The dict returned holds the same
        losses as the plain call (the same numbers, detached) in a :class:`BranchwiseLosses`, with a scalar
        (of value 0) whose ``backward()`` delivers the gradients gathered so far: the decoder's and the
        queries' (taken out of ``.grad``) and the features', through the neck and the backbone. After it,
        ``.grad`` holds the gradient of ``loss_scale(loss)``, the same as the plain call's
        ``loss_scale(loss).backward()``.

        That last backward is the only one that ``DistributedDataParallel`` synchronises: the group
        backwards run inside the wrapped module's forward, where DDP's reducer ignores gradients (as under
        ``no_sync()``), and ``ddp(images, targets, branchwise=True).pending.backward()`` then
        reduces every parameter's whole gradient once, as one backward of the summed loss would.

        Arguments:
            images ``[B, 3, H, W]``, targets, mask ``[B, H, W]``: see the class docstring.
            branchwise: back-propagate group by group (above).
            loss_scale: applied to each group's total loss before its backward, e.g. a float16
                ``GradScaler``'s ``scale``; default none.
        """
        if isinstance(targets, Tensor):
            raise TypeError("The second argument is the list of targets; pass the padding mask as mask=... .")
        _check_images(images)
        sizes = self.image_sizes(images, targets, mask)
        with self.decoding(images, sizes) as features:
            return self._decode(features, sizes, targets, images, branchwise, loss_scale)

    @contextlib.contextmanager
    def decoding(self, images: Tensor, sizes: Tensor) -> Iterator[list[Tensor]]:
        """The features of `images` as the decoder reads them (in `sizes`' dtype), and the decoder's precision
        for the block: inside an autocast region, autocast off unless :attr:`low_precision_decoder` asks for
        it. Code that runs the decoder's layers itself (the refinement curve) decodes inside it, as
        :meth:`forward` and :meth:`predict` do, so that it computes the same numbers."""
        features = self.features(images)
        with self._decoder_precision(images.device.type):
            yield [level.to(sizes.dtype) for level in features]

    def _decoder_precision(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast switched off for the decoder, unless :attr:`low_precision_decoder` asks for it."""
        if self.low_precision_decoder or not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()
        return torch.autocast(device_type, enabled=False)

    def _decode(
        self,
        features: list[Tensor],
        sizes: Tensor,
        targets: Sequence[Mapping[str, Any]] | None,
        images: Tensor,
        branchwise: bool,
        loss_scale: Callable[[Tensor], Tensor] | None,
    ) -> dict[str, Tensor] | list[dict[str, Tensor]] | BranchwiseLosses:
        if self.training:
            targets = self._require_targets(targets, images)
            if branchwise:
                return self._branchwise_step(features, sizes, targets, loss_scale)
            outputs: dict[str, Outputs] = {}
            for group in self.training_branches(features, sizes):
                outputs.update(group)
            return self.losses(outputs, targets)
        outputs_final = self.inference_outputs(features, sizes)
        given = [t for t in targets or () if "orig_size" in t]
        if given and len(given) < len(targets):  # type: ignore[arg-type]
            raise ValueError(
                f"{len(given)} of {len(targets)} targets have an orig_size: give it for every image (its boxes "  # type: ignore[arg-type]
                "are returned in those pixels) or for none (boxes in the input's pixels)"
            )
        if given:
            out_sizes = torch.stack([torch.as_tensor(t["orig_size"]) for t in given]).to(sizes)
        else:
            out_sizes = sizes
        return self.postprocess(outputs_final, out_sizes)

    def _branchwise_step(
        self,
        features: Sequence[Tensor],
        sizes: Tensor,
        targets: Sequence[Mapping[str, Any]],
        loss_scale: Callable[[Tensor], Tensor] | None,
    ) -> BranchwiseLosses:
        # Leaf copies cut the graph at the features: each group's backward stops there, so the backbone's
        # graph survives until the last backward, which sends the copies' summed gradient through it.
        shared = ik.SharedInputs(list(features))
        (copies,) = shared.inputs
        result: dict[str, Tensor] = {}
        total = None
        for group in self.training_branches(copies, sizes):
            losses = self.losses(group, targets)
            loss = losses.pop("loss")
            with torch.autocast(sizes.device.type, enabled=False):
                (loss if loss_scale is None else loss_scale(loss)).backward()
            # Summed as losses() sums the branches, so that the total is the same number.
            total = loss.detach() if total is None else total + loss.detach()
            result.update({k: v.detach() for k, v in losses.items()})
        assert total is not None, "a detector must supervise at least one branch"
        result["loss"] = total
        tensors, grads = [], []
        for param in self.parameters():
            if param.grad is not None:
                tensors.append(param)
                grads.append(param.grad)
                param.grad = None
        sources, gathered = shared.take_gradients()
        tensors += sources
        grads += gathered
        if tensors:
            pending = _DeliverGradients.apply(grads, *tensors)
        else:  # nothing trainable was reached: a backward with nothing to deliver
            pending = torch.zeros((), device=sizes.device, requires_grad=True)
        return BranchwiseLosses(result, pending)

    def predict(
        self, images: Tensor, *, mask: Tensor | None = None, image_sizes: Tensor | None = None
    ) -> Outputs:
        """The final raw outputs ``{"pred_logits" [B, N, C], "pred_boxes" [B, N, 4]}`` in any mode.

        Arguments:
            images, mask: as for :meth:`forward`.
            image_sizes: ``[B, 2]`` real ``(h, w)``; default from ``mask``.
        """
        _check_images(images)
        sizes = self.image_sizes(images, mask=mask) if image_sizes is None else image_sizes.to(images)
        with self.decoding(images, sizes) as features:
            return self.inference_outputs(features, sizes)

    def losses(
        self, outputs: Mapping[str, Outputs], targets: Sequence[Mapping[str, Any]]
    ) -> dict[str, Tensor]:
        """Each branch's criterion terms as ``"{branch}_{term}"`` and their total ``loss`` (equal weights)."""
        if not outputs:
            raise ValueError("a detector must supervise at least one branch")
        result: dict[str, Tensor] = {}
        total = None
        # One batched criterion call for all branches: one match, one reduction per term.
        for name, terms in self.criterion.branch_losses(outputs, targets).items():
            result.update({f"{name}_{k}": v for k, v in terms.items()})
            total = terms["loss"] if total is None else total + terms["loss"]
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

        The gradients equal those of ``(loss_scale * model(images, targets)["loss"]).backward()``, while
        memory holds one group's graph at a time (branch-wise training, see :meth:`forward`). Under
        ``DistributedDataParallel`` call the wrapper instead:
        ``ddp(images, targets, branchwise=True).pending.backward()``, as the engine does.

        Arguments:
            images, targets, mask: as for :meth:`forward`.
            loss_scale: multiplies every loss before its backward (e.g. a ``GradScaler``'s scale).

        Returns:
            The same dict as :meth:`forward`, detached.
        """
        if not self.training:
            raise RuntimeError("forward_backward trains: call model.train() first.")
        scale = None if loss_scale == 1.0 else (lambda loss: loss_scale * loss)
        result = self(images, targets, mask=mask, branchwise=True, loss_scale=scale)
        assert isinstance(result, BranchwiseLosses)
        result.pending.backward()
        return result.losses

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


class _DeliverGradients(torch.autograd.Function):
    """Zero in the forward; its backward hands each input the gradient given for it.

    One backward of this scalar puts already computed gradients where a backward of the loss would have
    put them, so that hooks on that backward (DDP's gradient reduction) see every gradient once.
    """

    @staticmethod
    def forward(ctx: Any, grads: list[Tensor], *tensors: Tensor) -> Tensor:
        ctx.grads = grads
        return torch.zeros((), device=tensors[0].device)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        # One multi-tensor multiply (as torch's optimisers use), not one call per parameter.
        return (None, *torch._foreach_mul(grads, grad_output))


def _check_images(images: Tensor) -> None:
    """Refuse what cannot be a normalised batch: integer pixels, or not ``[B, 3, H, W]``."""
    if not images.is_floating_point():
        raise TypeError(
            f"images are {images.dtype}; the detectors take float images normalised by ImageNet's mean and std, "
            "as make_eval_transforms / make_train_transforms give them (ToDtype(float32, scale=True), then "
            "Normalize), batched by collate_detection"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] batch, got shape {tuple(images.shape)}")


def _check_sizes(sizes: Tensor, from_mask: Tensor | None, images: Tensor) -> None:
    """Refuse targets' ``size`` that disagrees with the mask, or exceeds the padded image (``(w, h)``
    given for ``(h, w)``, a size before the resize)."""
    padded = torch.tensor(images.shape[-2:], device=sizes.device)
    bad = (sizes > padded).any(dim=1) | (sizes <= 0).any(dim=1)
    if from_mask is not None:
        bad |= (sizes != from_mask.to(sizes)).any(dim=1)
    if bool(bad.any()):
        image = int(bad.nonzero()[0])
        masked = f", the mask says {from_mask[image].tolist()}" if from_mask is not None else ""
        raise ValueError(
            f"targets[{image}]['size'] is {sizes[image].tolist()} for a batch padded to {padded.tolist()}"
            f"{masked}: size is the image's (h, w) after the transforms, as collate_detection pads it"
        )


def _check_mask(mask: Tensor, images: Tensor) -> None:
    """Refuse a padding mask that would give wrong image sizes: not bool, another shape, or inverted."""
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be a bool tensor, True on padding (as collate_detection makes it), got {mask.dtype}; "
            "for a 0/1 'pixel_mask' that marks valid pixels pass mask=pixel_mask == 0"
        )
    if mask.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"mask must be [B, H, W] = {[images.shape[0], *images.shape[-2:]]}, got {list(mask.shape)}"
        )
    # Images are padded at the bottom and right: the top-left pixel always belongs to the image.
    inverted = mask[:, 0, 0]
    if bool(inverted.any()):
        raise ValueError(
            f"mask is True at the top-left pixel of image {int(inverted.nonzero()[0])}: True must mark padding "
            "(bottom and right), so this mask looks inverted (True = valid pixels); pass ~mask"
        )
