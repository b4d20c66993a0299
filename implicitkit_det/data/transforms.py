"""Training and evaluation transforms, composed from torchvision's transforms v2.

Both pipelines take ``(image, target)`` with ``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` and
``target["labels"]`` a tensor (what :class:`~implicitkit_det.data.coco.CocoDetectionDataset` gives them),
move boxes with the image, and end with a float image normalised by ``mean`` / ``std``.

The sizes are parameters so that CPU runs can use small images; the defaults are the COCO settings:
shorter side 800 capped at 1333 for the 1x schedule and for evaluation, and the multi-scale + crop recipe
(shorter side in 480..800 step 32, or with probability 0.5 a resize to 400/500/600, a random crop with sides
in 384..600, then the multi-scale resize) for the longer schedules.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTI_SCALES",
    "RandomSizeCrop",
    "make_eval_transforms",
    "make_train_transforms",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Shorter-side sizes of the multi-scale recipe: 480, 512, ..., 800.
MULTI_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))


class RandomSizeCrop(v2.Transform):
    """Crop a region whose width and height are drawn uniformly from ``[min_size, max_size]``.

    Each side is capped by the image's own side, and the region's position is uniform over the positions
    that fit. Boxes are moved and clamped with the image; follow with ``SanitizeBoundingBoxes`` to drop
    those left empty.

    Arguments:
        min_size, max_size: bounds on the crop's sides in pixels.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _spatial_size(flat_inputs)

        def side(full: int) -> int:
            lo, hi = min(self.min_size, full), min(self.max_size, full)
            return int(torch.randint(lo, hi + 1, ()))

        h, w = side(height), side(width)
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def _spatial_size(flat_inputs: list[Any]) -> tuple[int, int]:
    spatial = (tv_tensors.Image, tv_tensors.Video, tv_tensors.Mask, tv_tensors.BoundingBoxes, PIL.Image.Image)
    sizes = {tuple(F.get_size(x)) for x in flat_inputs if isinstance(x, spatial)}
    if len(sizes) != 1:
        raise ValueError(f"expected one image size among the inputs, found {sorted(sizes)}")
    return sizes.pop()  # type: ignore[return-value]


def _to_normalized_float(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def make_train_transforms(
    *,
    scales: Sequence[int] = (800,),
    max_size: int | None = 1333,
    crop: bool = False,
    crop_scales: Sequence[int] = (400, 500, 600),
    crop_size: tuple[int, int] = (384, 600),
    crop_prob: float = 0.5,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The training pipeline: flip, resize by the shorter side (optionally with the crop branch), normalise.

    Arguments:
        scales: shorter-side sizes, one drawn per sample (``(800,)`` for the 1x schedule;
            :data:`MULTI_SCALES` for the multi-scale recipe).
        max_size: cap on the longer side after resizing (``None``: no cap).
        crop: add the crop branch: with probability `crop_prob`, resize to one of `crop_scales`, crop a
            random region with sides in `crop_size`, then resize by `scales` as usual.
        hflip_prob: probability of a horizontal flip.
        mean, std: per-channel normalisation of the ``[0, 1]`` image.

    Returns:
        A ``v2.Compose`` mapping ``(image, target)`` to ``(normalised float image, target)``; boxes
        that end up smaller than one pixel are removed with their labels.
    """
    resize = v2.RandomShortestSize(list(scales), max_size=max_size)
    geometric: v2.Transform = resize
    if crop:
        crop_branch = v2.Compose(
            [v2.RandomShortestSize(list(crop_scales)), RandomSizeCrop(*crop_size), resize]
        )
        geometric = v2.RandomChoice([resize, crop_branch], p=[1.0 - crop_prob, crop_prob])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(hflip_prob),
            geometric,
            v2.SanitizeBoundingBoxes(),
            *_to_normalized_float(mean, std),
        ]
    )


def make_eval_transforms(
    *,
    size: int = 800,
    max_size: int | None = 1333,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """The evaluation pipeline: resize the shorter side to `size` (longer side at most `max_size`), normalise.

    The aspect ratio is kept (up to rounding the resized sides to whole pixels), so boxes normalised by the
    resized image equal boxes normalised by the original one, which is what the post-processor relies on.
    """
    return v2.Compose([v2.Resize(size, max_size=max_size), *_to_normalized_float(mean, std)])
