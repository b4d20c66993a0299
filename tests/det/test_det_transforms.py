"""Transforms keep boxes consistent with the image; batching pads to a multiple of 32 with a mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors
from torchvision.transforms import v2

from implicitkit_det.data import (
    CocoDetectionDataset,
    RandomSizeCrop,
    collate_detection,
    make_eval_transforms,
    make_train_transforms,
    pad_images,
)

# No normalisation, so pixel values stay readable in [0, 1].
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def sample(h: int = 60, w: int = 80) -> tuple[tv_tensors.Image, dict]:
    image = tv_tensors.Image(torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[10.0, 5, 30, 35], [50, 20, 75, 50]]), format="XYXY", canvas_size=(h, w)
    )
    return image, {"boxes": boxes, "labels": torch.tensor([1, 2]), "image_id": 1}


def test_flip_twice_is_identity_and_once_mirrors():
    image, target = sample()
    flip = v2.RandomHorizontalFlip(p=1.0)
    once_img, once = flip(image, target)
    twice_img, twice = flip(once_img, once)
    assert torch.equal(twice_img, image)
    assert torch.equal(twice["boxes"], target["boxes"])
    # x -> W - x, with x0 and x1 swapping roles.
    assert once["boxes"].tolist() == [[50.0, 5, 70, 35], [5, 20, 30, 50]]
    assert torch.equal(once_img, image.flip(-1))


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(8, 64),
    w=st.integers(8, 64),
    size=st.integers(8, 96),
    corners=st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=0, max_size=5),
)
def test_flip_and_resize_properties(h, w, size, corners):
    xyxy = torch.tensor(
        [[min(a, c) * w, min(b, d) * h, max(a, c) * w, max(b, d) * h] for a, b, c, d in corners]
    ).reshape(-1, 4)
    image = tv_tensors.Image(torch.rand(3, h, w))
    target = {
        "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(h, w)),
        "labels": torch.zeros(len(xyxy)),
    }
    flip = v2.RandomHorizontalFlip(p=1.0)
    img2, t2 = flip(*flip(image, target))
    assert torch.equal(img2, image)
    torch.testing.assert_close(t2["boxes"].as_subclass(torch.Tensor), xyxy)
    # Resizing scales each coordinate by the ratio of the sides.
    img3, t3 = v2.Resize(size)(image, target)
    nh, nw = img3.shape[-2:]
    assert min(nh, nw) == size
    scale = torch.tensor([nw / w, nh / h, nw / w, nh / h])
    torch.testing.assert_close(t3["boxes"].as_subclass(torch.Tensor), xyxy * scale)


def test_eval_resize_scales_boxes_by_the_image_ratio():
    image, target = sample(60, 80)
    out_img, out = make_eval_transforms(size=120, max_size=1000, **PLAIN)(image, target)
    assert out_img.shape[-2:] == (120, 160)  # shorter side 60 -> 120, ratio kept
    torch.testing.assert_close(
        out["boxes"].as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor) * 2
    )
    # max_size caps the longer side: 80 * 1.5 = 120 > 100, so the factor becomes 100 / 80.
    out_img, out = make_eval_transforms(size=90, max_size=100, **PLAIN)(image, target)
    assert out_img.shape[-2:] == (75, 100)
    torch.testing.assert_close(
        out["boxes"].as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor) * 1.25
    )


def test_normalisation():
    image = tv_tensors.Image(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(8, 8)),
        "labels": torch.zeros(0),
    }
    out, _ = make_eval_transforms(size=8, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))(image, target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))


def test_random_size_crop_bounds():
    image, target = sample(60, 80)
    crop = RandomSizeCrop(20, 50)
    torch.manual_seed(0)
    for _ in range(50):
        out_img, out = crop(image, target)
        h, w = out_img.shape[-2:]
        assert 20 <= h <= 50 and 20 <= w <= 50
        assert out["boxes"].canvas_size == (h, w)
        b = out["boxes"].as_subclass(torch.Tensor)
        assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
    # Sides larger than the image are capped by it.
    out_img, _ = RandomSizeCrop(100, 200)(image, target)
    assert out_img.shape[-2:] == (60, 80)
    with pytest.raises(ValueError):
        RandomSizeCrop(10, 5)


@pytest.mark.parametrize("crop", [False, True])
def test_train_pipeline_keeps_boxes_on_their_pixels(coco_files, crop):
    # The fixture paints every box white on black; after any random flip / resize / crop, each box must
    # still frame white pixels, and the white pixels must lie inside the boxes.
    tf = make_train_transforms(
        scales=(48, 64, 80),
        max_size=120,
        crop=crop,
        crop_scales=(40, 60),
        crop_size=(24, 48),
        crop_prob=1.0,
        **PLAIN,
    )
    ds = CocoDetectionDataset(*coco_files, transforms=tf)
    i = ds.ids.index(1)
    torch.manual_seed(0)
    for _ in range(25):
        image, t = ds[i]
        h, w = image.shape[-2:]
        assert t["size"].tolist() == [h, w] and t["orig_size"].tolist() == [60, 80]
        if not crop:
            assert min(h, w) in (48, 64, 80) or max(h, w) == 120
        white = image[0] > 0.5
        inside = torch.zeros_like(white)
        for x0, y0, x1, y1 in t["boxes"].tolist():
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            # Interior pixels (away from the interpolated border) are white.
            xi0, yi0, xi1, yi1 = int(x0) + 1, int(y0) + 1, int(x1) - 1, int(y1) - 1
            if xi1 > xi0 and yi1 > yi0:
                assert white[yi0:yi1, xi0:xi1].float().mean() > 0.95
            inside[max(int(y0) - 1, 0) : int(y1) + 2, max(int(x0) - 1, 0) : int(x1) + 2] = True
        assert not (white & ~inside).any()
        torch.testing.assert_close(t["boxes_normalized"], t["boxes"] / torch.tensor([w, h, w, h]))
        assert len(t["labels"]) == len(t["boxes"])


def test_pad_images_and_mask():
    a, b = torch.ones(3, 50, 70), 2 * torch.ones(3, 64, 33)
    batch, mask = pad_images([a, b], size_divisor=32)
    assert batch.shape == (2, 3, 64, 96) and mask.shape == (2, 64, 96)
    assert (
        torch.equal(batch[0, :, :50, :70], a)
        and batch[0, :, 50:].abs().sum() == 0
        and batch[0, :, :, 70:].abs().sum() == 0
    )
    assert torch.equal(batch[1, :, :64, :33], b)
    assert mask[0, :50, :70].logical_not().all() and mask[0, 50:].all() and mask[0, :, 70:].all()
    assert mask.logical_not().sum(dim=(1, 2)).tolist() == [50 * 70, 64 * 33]
    batch, _ = pad_images([torch.ones(3, 64, 64)], size_divisor=32)
    assert batch.shape == (1, 3, 64, 64)  # already a multiple: no padding
    with pytest.raises(
        ValueError, match=r"share channels and dtype, got \(channels, dtype\) \[\(3, 'torch.float32'\)"
    ):
        pad_images([a, torch.ones(3, 8, 8, dtype=torch.uint8)])  # the raw image would be cast, not refused
    for bad in (0, -32, 32.0):  # 0 divided by zero, -32 gave a negative size
        with pytest.raises(ValueError, match=rf"size_divisor must be a positive whole number .*got {bad!r}"):
            pad_images([a], size_divisor=bad)


def test_collate_keeps_targets_and_sizes(coco_files):
    ds = CocoDetectionDataset(*coco_files, transforms=make_eval_transforms(size=40, max_size=90))
    batch = collate_detection([ds[0], ds[1], ds[2]])
    assert batch.images.shape[0] == 3 and len(batch) == 3
    assert batch.images.shape[-2] % 32 == 0 and batch.images.shape[-1] % 32 == 0
    for i, t in enumerate(batch.targets):
        h, w = t["size"].tolist()
        assert not batch.mask[i, :h, :w].any() and batch.mask[i].sum() == batch.mask[i].numel() - h * w
    moved = batch.to("cpu")
    assert (
        torch.equal(moved.images, batch.images)
        and moved.targets[0]["image_id"] == batch.targets[0]["image_id"]
    )


def test_dataloader_over_the_digits_set(tiny_digits):
    from functools import partial

    from torch.utils.data import DataLoader

    ds = CocoDetectionDataset(
        tiny_digits.images("train"),
        tiny_digits.annotations("train"),
        transforms=make_train_transforms(
            scales=(64, 80, 96), max_size=128, crop=True, crop_scales=(48, 64), crop_size=(40, 64)
        ),
    )
    loader = DataLoader(
        ds, batch_size=4, shuffle=True, collate_fn=partial(collate_detection, size_divisor=16)
    )
    seen = 0
    for batch in loader:
        assert batch.images.shape[-1] % 16 == 0 and batch.images.shape[-2] % 16 == 0
        assert batch.images.dtype == torch.float32 and batch.mask.dtype == torch.bool
        for i, t in enumerate(batch.targets):
            h, w = t["size"].tolist()
            assert h <= 128 and w <= 128
            assert not batch.mask[i, :h, :w].any()
            assert ((t["boxes_normalized"] >= 0) & (t["boxes_normalized"] <= 1)).all()
        seen += len(batch)
    assert seen == len(ds) == 10
