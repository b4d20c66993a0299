"""Batching images of different sizes: pad to a common size and keep a mask of the padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DetectionBatch", "collate_detection", "pad_images"]


@dataclass
class DetectionBatch:
    """A padded batch.

    Attributes:
        images: ``[B, 3, H, W]``, each image in the top-left corner, zeros elsewhere; ``H`` and ``W`` are
            multiples of the collate's ``size_divisor``.
        mask: ``[B, H, W]`` bool, True on padding.
        targets: one dict per image (see :func:`~implicitkit_det.data.coco.finalize_target`); each image's
            real size is ``targets[i]["size"]``.
    """

    images: torch.Tensor
    mask: torch.Tensor
    targets: list[dict[str, Any]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        """The batch with every tensor (targets included) moved to `device`."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DetectionBatch:
        """The batch in page-locked memory; ``DataLoader(pin_memory=True)`` calls this."""
        return self._map(lambda v: v.pin_memory())

    def _map(self, fn: Any) -> DetectionBatch:
        def apply(v: Any) -> Any:
            return fn(v) if isinstance(v, torch.Tensor) else v

        return DetectionBatch(
            apply(self.images), apply(self.mask), [{k: apply(v) for k, v in t.items()} for t in self.targets]
        )

    def __len__(self) -> int:
        return len(self.targets)


def pad_images(images: Sequence[torch.Tensor], size_divisor: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[C, h_i, w_i]`` images into one zero-padded tensor.

    Arguments:
        images: tensors of equal channels and dtype, any spatial sizes.
        size_divisor: the padded ``H`` and ``W`` are the largest ``h_i``, ``w_i`` rounded up to a multiple
            of this (the coarsest backbone stride, so every feature level aligns).

    Returns:
        ``(batch [B, C, H, W], mask [B, H, W])`` with ``mask`` True on padding.
    """
    if not images:
        raise ValueError("cannot batch an empty list of images")
    if isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1:
        raise ValueError(
            f"size_divisor must be a positive whole number of pixels (32: the coarsest backbone stride), got "
            f"{size_divisor!r}"
        )
    kinds = sorted({(int(img.shape[0]), str(img.dtype)) for img in images})
    if len(kinds) > 1:  # copying into one batch would cast (a uint8 image among normalised floats) or fail
        raise ValueError(
            f"images of one batch must share channels and dtype, got (channels, dtype) {kinds}: apply the same "
            "transforms to every sample"
        )
    h = max(int(img.shape[-2]) for img in images)
    w = max(int(img.shape[-1]) for img in images)
    h = -(-h // size_divisor) * size_divisor
    w = -(-w // size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[-2], : img.shape[-1]].copy_(img)
        mask[i, : img.shape[-2], : img.shape[-1]] = False
    return batch, mask


def collate_detection(
    samples: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int = 32
) -> DetectionBatch:
    """``collate_fn`` for a ``DataLoader`` over ``(image, target)`` samples.

    Use ``functools.partial(collate_detection, size_divisor=...)`` for another divisor.
    """
    images, targets = zip(*samples, strict=True)
    batch, mask = pad_images([img.as_subclass(torch.Tensor) for img in images], size_divisor)
    return DetectionBatch(batch, mask, list(targets))
