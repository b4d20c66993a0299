"""The bundled digits set: deterministic, disjoint splits, cached by fingerprint, loadable as COCO."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from implicitkit_det.data import (
    CocoDetectionDataset,
    DigitsDetectionConfig,
    build_digits_detection,
    default_cache_dir,
    digits_detection_dataset,
)

SMALL = DigitsDetectionConfig(seed=11, num_train=4, num_val=2, image_size=(48, 64), glyph_size=(8, 32))


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = build_digits_detection(SMALL, cache_dir=tmp_path / "a")
    b = build_digits_detection(SMALL, cache_dir=tmp_path / "b")
    da, db = digests(a.root), digests(b.root)
    assert len(da) == 4 + 2 + 3  # PNGs, two annotation files, the manifest
    assert da == db
    c = build_digits_detection(dataclasses.replace(SMALL, seed=12), cache_dir=tmp_path / "a")
    assert c.root != a.root
    dc = digests(c.root)
    assert dc["train/000000.png"] != da["train/000000.png"]


def test_splits_share_no_glyph(tiny_digits):
    glyphs = {}
    for split in ("train", "val"):
        coco = json.loads(tiny_digits.annotations(split).read_text())
        glyphs[split] = {a["glyph_index"] for a in coco["annotations"]}
        assert glyphs[split]
    assert not glyphs["train"] & glyphs["val"]
    # The manifest's pools partition all 1797 glyphs, and each annotation's class is its glyph's class.
    manifest = json.loads((tiny_digits.root / "manifest.json").read_text())
    train_pool, val_pool = (set(manifest["splits"][s]["glyph_pool"]) for s in ("train", "val"))
    assert not train_pool & val_pool and len(train_pool | val_pool) == 1797
    assert glyphs["train"] <= train_pool and glyphs["val"] <= val_pool
    target = load_digits().target
    for split in ("train", "val"):
        coco = json.loads(tiny_digits.annotations(split).read_text())
        assert all(a["category_id"] == target[a["glyph_index"]] for a in coco["annotations"])
    # Every class has val glyphs (the split is stratified).
    assert {int(target[g]) for g in val_pool} == set(range(10))


def test_coco_files_are_well_formed(tiny_digits):
    cfg = json.loads((tiny_digits.root / "manifest.json").read_text())["config"]
    for split, n in (("train", 10), ("val", 5)):
        coco = json.loads(tiny_digits.annotations(split).read_text())
        assert [c["name"] for c in coco["categories"]] == [str(i) for i in range(10)]
        assert [c["id"] for c in coco["categories"]] == list(range(10))
        assert len(coco["images"]) == n
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1
        per_image = {img["id"]: 0 for img in coco["images"]}
        for img in coco["images"]:
            with Image.open(tiny_digits.images(split) / img["file_name"]) as picture:
                w, h = picture.size
            assert (w, h) == (img["width"], img["height"])
            assert cfg["image_size"][0] <= min(w, h) and max(w, h) <= cfg["image_size"][1]
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            img = next(i for i in coco["images"] if i["id"] == a["image_id"])
            assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"] and w > 0 and h > 0
            assert a["area"] == w * h and a["iscrowd"] == 0
            per_image[a["image_id"]] += 1
        assert all(1 <= c <= 4 for c in per_image.values())


def test_boxes_frame_ink(tiny_digits):
    # Glyph ink contrasts with the background, so a glyph's box must differ from the canvas around it
    # far more than pixel noise does.
    coco = json.loads(tiny_digits.annotations("train").read_text())
    img = coco["images"][0]
    with Image.open(tiny_digits.images("train") / img["file_name"]) as picture:
        pixels = np.asarray(picture, dtype=np.float32)
    for a in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
        x, y, w, h = a["bbox"]
        patch = pixels[y : y + h, x : x + w]
        assert patch.std(axis=(0, 1)).max() > 20.0


def test_cache_is_reused_and_fingerprinted(tmp_path, monkeypatch):
    first = build_digits_detection(SMALL, cache_dir=tmp_path)
    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    again = build_digits_detection(SMALL, cache_dir=tmp_path)
    assert again.root == first.root and (again.root / "manifest.json").stat().st_mtime_ns == stamp
    assert SMALL.fingerprint() in first.root.name
    other = dataclasses.replace(SMALL, noise_std=0.0)
    assert other.fingerprint() != SMALL.fingerprint()
    # No temporary build folders are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.root.name]

    monkeypatch.setenv("IMPLICITKIT_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env" / "digits_det"
    monkeypatch.delenv("IMPLICITKIT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "implicitkit" / "digits_det"


def test_loads_as_a_coco_dataset(tiny_digits):
    ds = CocoDetectionDataset(tiny_digits.images("val"), tiny_digits.annotations("val"))
    assert len(ds) == 5 and ds.num_classes == 10 and ds.skipped["degenerate"] == 0
    image, target = ds[0]
    assert image.shape[0] == 3 and target["labels"].max() < 10
    assert torch.all(target["boxes_normalized"] <= 1) and torch.all(target["boxes_normalized"] >= 0)


def test_dataset_helper_uses_the_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICITKIT_CACHE", str(tmp_path))
    ds = digits_detection_dataset("val", config=SMALL)
    assert len(ds) == 2
    assert Path(ds.root).is_relative_to(tmp_path / "digits_det")
    with pytest.raises(ValueError, match="split"):
        digits_detection_dataset("test", config=SMALL)


def test_bad_config():
    with pytest.raises(ValueError, match="glyph_size"):
        DigitsDetectionConfig(image_size=(64, 96), glyph_size=(8, 80))
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDetectionConfig(val_fraction=1.0)


def test_concurrent_builds_agree(tmp_path):
    # Two builders racing on one cache: both end with the same complete folder and leave no temporaries.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        roots = list(pool.map(lambda _: build_digits_detection(SMALL, cache_dir=tmp_path).root, range(2)))
    assert roots[0] == roots[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [roots[0].name]
    assert digests(roots[0]) == digests(build_digits_detection(SMALL, cache_dir=tmp_path / "fresh").root)


def test_a_build_killed_part_way_is_cleaned_up_later(tmp_path):
    """A killed build's temporary folder stayed in the cache for good (up to 60 MB each)."""
    import os
    import time

    abandoned, running = tmp_path / ".building-old", tmp_path / ".building-now"
    for folder in (abandoned, running):
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "000000.png").write_bytes(b"x")
    hours_ago = time.time() - 3 * 3600
    for folder in (abandoned, abandoned / "train", running):  # a live build writes into its split folders
        os.utime(folder, (hours_ago, hours_ago))
    build_digits_detection(SMALL, cache_dir=tmp_path)
    assert not abandoned.exists() and running.exists()  # another process may be writing the recent one
