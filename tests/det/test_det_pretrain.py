"""Backbone pre-training on a split's own objects: the crops, the cache, and loading into the detector."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from implicitkit_det import pretrain
from implicitkit_det.data.digits import DigitsDetectionFiles
from implicitkit_det.models.backbone import ResNetBackbone
from implicitkit_det.pretrain import PretrainConfig, object_crops, pretrain_backbone

TINY = PretrainConfig(crop_size=16, views=2, background_per_image=3, epochs=1, batch_size=8)


def test_object_crops_hold_their_objects_and_background_holds_none(coco_files):
    # The fixture paints every non-crowd box white on black: an object crop is white at its centre, a
    # background crop is mostly black.
    images, ann = coco_files
    crops, labels, names = object_crops(images, ann, TINY)
    assert names == ["cat", "dog", "bird"]  # sorted category ids 3, 7, 12
    objects = labels < 3
    # Non-crowd annotations: dog, bird, cat (clipped), cat; each cut `views` times.
    assert sorted(labels[objects].tolist()) == sorted([1, 2, 0, 0] * TINY.views)
    assert crops.shape[1:] == (3, 16, 16) and crops.dtype == torch.uint8
    centre = crops[objects][:, :, 7:9, 7:9].float().mean(dim=(1, 2, 3))
    assert (centre > 150).all()
    background = crops[~objects].float().mean(dim=(1, 2, 3))
    assert len(background) > 0 and (background < 0.35 * 255).all()


def test_pretrain_is_cached_and_loads_into_the_backbone(tiny_digits, tmp_path, monkeypatch):
    images, ann = tiny_digits.images("train"), tiny_digits.annotations("train")
    path = pretrain_backbone(images, ann, TINY, cache_dir=tmp_path)
    state = torch.load(path, weights_only=True)
    assert state["fc.weight"].shape[0] == 11  # ten digits and background

    def no_training(*args, **kwargs):
        raise AssertionError("the cached weights should have been reused")

    monkeypatch.setattr(pretrain, "train_classifier", no_training)
    assert pretrain_backbone(images, ann, TINY, cache_dir=tmp_path) == path
    with pytest.raises(AssertionError, match="reused"):  # another setting is another file
        pretrain_backbone(images, ann, dataclasses.replace(TINY, seed=1), cache_dir=tmp_path)
    assert not list(tmp_path.glob(".writing-*"))

    backbone = ResNetBackbone("resnet10", weights=path)
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.stages[3][0].conv2.weight, state["layer4.0.conv2.weight"])
    assert not backbone.stem[0].weight.requires_grad and backbone.stages[1][0].conv1.weight.requires_grad


def test_the_cache_key_follows_the_annotations_and_the_images(tiny_digits, tmp_path):
    ann, images = tiny_digits.annotations("train"), tiny_digits.images("train")
    changed = tmp_path / "instances.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][1:]
    changed.write_text(json.dumps(data))
    assert TINY.fingerprint(ann, images) != TINY.fingerprint(changed, images)
    # Sets that differ in their pixels only (another noise level) have the same annotations: it reused the
    # weights trained on the other set's pixels.
    other = tmp_path / "images"
    shutil.copytree(images, other)
    first = other / data["images"][0]["file_name"]
    first.write_bytes(first.read_bytes() + b"\0")
    assert TINY.fingerprint(ann, images) != TINY.fingerprint(ann, other)


def test_a_split_without_images_is_refused(tmp_path):
    ann = tmp_path / "empty.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(ValueError, match="no images"):
        object_crops(tmp_path, ann, TINY)


def test_the_digits_backbone_reads_the_train_split_only(monkeypatch, tmp_path):
    # The demo's backbone stands in for ImageNet weights: it must never see a val glyph.
    from implicitkit_det import recipes

    seen = []
    monkeypatch.setattr(recipes, "build_digits_detection", lambda config=None: DigitsDetectionFiles(tmp_path))
    monkeypatch.setattr(recipes, "pretrain_backbone", lambda *paths, **_: seen.extend(paths) or "w.pth")
    assert recipes.digits_backbone() == "w.pth"
    assert seen[:2] == [tmp_path / "train", tmp_path / "annotations" / "instances_train.json"]
    args = recipes.digits_recipe("adamixer_tiny")
    assert args[:2] == ["--config", "adamixer_tiny"] and args[-1] == "backbone_weights=w.pth"


def test_weights_of_another_depth_are_named_not_a_bare_size_mismatch(tmp_path):
    # load_state_dict raised a RuntimeError that the command line does not catch (a traceback).
    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"r50.pth does not fit torchvision.s resnet10: shapes differ"):
        ResNetBackbone("resnet10", weights=tmp_path / "r50.pth")
