"""Shared fixtures: a small hand-written COCO folder and a tiny bundled digits set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from implicitkit_det.data import DigitsDetectionConfig, build_digits_detection

# Category ids deliberately not contiguous and not starting at 0.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "bird"}]
# image id -> (width, height)
IMAGES = {1: (80, 60), 2: (64, 64), 3: (50, 70)}
ANNOTATIONS = [
    {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0},
    {"id": 2, "image_id": 1, "category_id": 12, "bbox": [50, 20, 25, 30], "area": 750, "iscrowd": 0},
    {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
    # Sticks out of the 80x60 image: clipped to [70, 40, 80, 60].
    {"id": 4, "image_id": 1, "category_id": 3, "bbox": [70, 40, 20, 30], "area": 600, "iscrowd": 0},
    {"id": 5, "image_id": 3, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
]
# Image 2 has no annotations.


def write_coco(
    root: Path,
    annotations: list[dict] | None = None,
    images: dict[int, tuple[int, int]] | None = None,
    categories: list[dict] | None = None,
) -> tuple[Path, Path]:
    """Write PNGs and an annotation file under `root`; return ``(image folder, annotation file)``.

    Each image is black with its non-crowd annotation boxes painted white, so a test can check that boxes
    still cover the right pixels after a transform.
    """
    annotations = ANNOTATIONS if annotations is None else annotations
    images = IMAGES if images is None else images
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, (w, h) in images.items():
        pixels = np.zeros((h, w, 3), dtype=np.uint8)
        for ann in annotations:
            if ann.get("image_id") != image_id or ann.get("iscrowd", 0):
                continue
            try:
                x, y, bw, bh = (int(v) for v in ann["bbox"])
            except (KeyError, TypeError, ValueError):  # the malformed boxes of the bad-input tests
                continue
            if bw > 0 and bh > 0:
                pixels[max(y, 0) : y + bh, max(x, 0) : x + bw] = 255
        name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(img_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    ann_file = root / "instances.json"
    ann_file.write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": categories or CATEGORIES})
    )
    return img_dir, ann_file


@pytest.fixture
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_coco(tmp_path)


TINY_DIGITS = DigitsDetectionConfig(
    seed=3, num_train=10, num_val=5, image_size=(64, 96), glyph_size=(10, 40), objects_per_image=(1, 4)
)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory: pytest.TempPathFactory):
    return build_digits_detection(TINY_DIGITS, cache_dir=tmp_path_factory.mktemp("digits_cache"))


@pytest.fixture
def make_coco(tmp_path: Path):
    """A factory ``make_coco(name, annotations=..., images=..., categories=...)`` writing into tmp_path/name."""

    def make(name: str = "coco", **kwargs) -> tuple[Path, Path]:
        return write_coco(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def float64():
    """Float64 as the default dtype for the test, restored after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
