"""Evaluation: run the model over a loader, turn its detections into COCO results, score them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..collectives import broadcast_object, is_dist, is_main_process
from ..data import DetectionBatch
from ..evaluation import CocoEvaluator, to_coco_results
from ..models.detector import QueryDetector
from .process_group import broadcast_buffers, unwrap
from .progress import progress_bar
from .train import autocast

__all__ = ["EvaluationStopped", "evaluate", "forward_eval", "rescale_to_original"]


class EvaluationStopped(KeyboardInterrupt):
    """An evaluation cut short on request (Ctrl-C)."""


BoxFrame = Literal["input", "original"]


def forward_eval(model: nn.Module, batch: DetectionBatch) -> list[dict[str, Tensor]]:
    """``model(images, mask=mask)`` in evaluation mode, checked to be a list of detections per image.

    The targets are not passed, so the model cannot see the answers; it learns each image's real size from
    the padding mask and returns boxes in the input image's pixels.
    """
    detections = model(batch.images, mask=batch.mask)
    if not isinstance(detections, Sequence) or len(detections) != len(batch):
        raise TypeError(
            f"in evaluation mode the model returned {type(detections).__name__}; the engine needs a list "
            "with one {'boxes', 'scores', 'labels'} dict per image (torchvision's convention). Is it in eval "
            "mode?"
        )
    return list(detections)


def rescale_to_original(
    detections: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]
) -> list[dict[str, Tensor]]:
    """Scale xyxy boxes from the network input's pixels (``target["size"]``) to the stored image's.

    The evaluation transform keeps the aspect ratio, so each axis has its own factor only up to rounding.
    """
    out = []
    for det, t in zip(detections, targets, strict=True):
        boxes = det["boxes"].float()
        (h, w), (oh, ow) = t["size"].tolist(), t["orig_size"].tolist()
        scale = boxes.new_tensor([ow / w, oh / h, ow / w, oh / h])
        out.append({**det, "boxes": boxes * scale})
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[DetectionBatch],
    evaluator: CocoEvaluator,
    *,
    device: torch.device,
    label_to_category_id: Sequence[int] | None = None,
    boxes_in: BoxFrame = "input",
    amp: bool = False,
    max_iters: int | None = None,
    verbose: bool = True,
    log: Callable[[str], None] = print,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Score the model on the loader's images with COCO's protocol.

    Arguments:
        model: the detector (plain or in DDP); set to evaluation mode here.
        loader: yields :class:`~implicitkit_det.data.DetectionBatch` with ``image_id``, ``size`` and
            ``orig_size`` in the targets. Under several processes each sees its share (the engine's
            :class:`~implicitkit_det.engine.process_group.DealtBatches`); the evaluator gathers them and
            drops an image seen twice (a padding ``DistributedSampler`` repeats some).
        evaluator: a fresh :class:`~implicitkit_det.evaluation.CocoEvaluator` over the ground truth.
        label_to_category_id: the dataset's map from contiguous labels to the file's category ids.
        boxes_in: whether the model's boxes are in the network input's pixels (``"input"``, rescaled
            here) or already in the stored image's (``"original"``).
        amp: run the model under :func:`~implicitkit_det.engine.train.autocast`.
        max_iters: stop after this many batches; only the images seen are then scored.
        verbose: print the COCO table on rank 0.
        progress: a progress bar on rank 0 (:func:`~implicitkit_det.engine.progress.progress_bar`).
        should_stop: checked before each batch; when it returns true, :class:`EvaluationStopped` is raised.

    Returns:
        The 12 COCO stats by name (``AP``, ``AP50``, ..., ``ARl``), ``per_class_AP``, ``images``
        (the distinct images scored, over all processes) and ``time_s``. For a model that reports its
        refinement steps per
        image (DEQDet's ``last_steps``), also ``mean_steps``: the mean applications of the refinement layer
        per image over all processes (images a padding sampler repeats included).
    """
    if boxes_in not in ("input", "original"):
        raise ValueError(f"boxes_in must be 'input' or 'original', got {boxes_in!r}")
    # The module itself, not its DDP wrapper: a wrapper's forward may broadcast buffers, a collective that
    # processes with unequal numbers of batches cannot all join. They are made equal once here instead.
    model = unwrap(model)
    broadcast_buffers(model)
    model.eval()
    evaluator.reset()
    start = time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if total is not None and max_iters is not None:
        total = min(total, max_iters)
    bar = progress_bar(total, "evaluating", unit="batch", enabled=progress)
    try:
        images, steps = _score_batches(
            model, loader, evaluator, device, label_to_category_id, boxes_in, amp, max_iters, should_stop, bar
        )
    finally:
        bar.close()
    evaluator.synchronize()
    images = broadcast_object(evaluator.num_images if is_main_process() else images)
    elapsed = time.perf_counter() - start
    if verbose and is_main_process():
        log(f"evaluated {images} images in {elapsed:.1f}s ({images / max(elapsed, 1e-9):.1f} images/s)")
    stats = evaluator.summarize(verbose=verbose)
    out = {**stats, "images": images, "time_s": elapsed}
    if is_dist():
        torch.distributed.all_reduce(steps)
    if steps[1] > 0:
        out["mean_steps"] = float(steps[0] / steps[1])
        if verbose and is_main_process():
            log(f"refinement steps per image: {out['mean_steps']:.2f} on average")
    return out


def _score_batches(
    model: nn.Module,
    loader: Iterable[DetectionBatch],
    evaluator: CocoEvaluator,
    device: torch.device,
    label_to_category_id: Sequence[int] | None,
    boxes_in: BoxFrame,
    amp: bool,
    max_iters: int | None,
    should_stop: Callable[[], bool] | None,
    bar: Any,
) -> tuple[int, Tensor]:
    """Detect on every batch and hand the results to `evaluator`; returns the images seen and the
    ``(sum of steps, images)`` the model reported (zeros when it reports none)."""
    images = 0
    steps = torch.zeros(2, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_iters is not None and i >= max_iters:
            break
        if should_stop is not None and should_stop():
            raise EvaluationStopped(f"evaluation stopped at batch {i}")
        batch = batch.to(device, non_blocking=True)
        with autocast(device, amp):
            detections = forward_eval(model, batch)
        steps += _reported_steps(model).to(device)
        if boxes_in == "input":
            detections = rescale_to_original(detections, batch.targets)
        ids = [t["image_id"] for t in batch.targets]
        evaluator.update(to_coco_results(detections, ids, label_to_category_id), image_ids=ids)
        images += len(ids)
        bar.update(1)
    return images, steps


def _reported_steps(model: nn.Module) -> Tensor:
    """``(sum, count)`` of the per-image steps the model kept from its last forward, or zeros."""
    inner = unwrap(model)
    last = inner.last_steps if isinstance(inner, QueryDetector) else None
    if last is None:
        return torch.zeros(2, dtype=torch.float64)
    inner.last_steps = None  # each batch is counted once
    return torch.tensor([float(last.sum()), float(last.numel())], dtype=torch.float64)
