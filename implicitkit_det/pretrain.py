"""Backbone pre-training on a detection set's own training objects.

The published detectors start from an ImageNet classifier. For a data set without such a classifier (the
bundled digits set: its glyphs are not ImageNet's objects) this module makes the equivalent from the
training split alone: it cuts every annotated object out of the training images, with a jittered margin
and scale, adds crops of background that hold no object, and trains the torchvision ResNet of the
detector's backbone to classify them (``C`` classes plus background) with cross-entropy. The classifier's
weights (``fc`` left out by the backbone loader) then initialise :class:`~.models.backbone.ResNetBackbone`
the way ImageNet weights do: stem and first stage frozen, batch-norm statistics frozen.

Only the training annotations and images are read, so a validation object is never seen. The result is
cached like the digits set: a file named by a fingerprint of the training annotation file's bytes and of
every pre-training parameter, written atomically, built on first use and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .data.digits import default_cache_dir
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .models.backbone import _DEPTHS

__all__ = ["PretrainConfig", "object_crops", "pretrain_backbone"]

logger = logging.getLogger(__name__)


#: Bump when the crops or the training change, so cached weights are not reused for another recipe.
PRETRAIN_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    """How the backbone classifier is trained; every field enters the cache fingerprint.

    Attributes:
        backbone: a :class:`~.models.backbone.ResNetBackbone` name (``"resnet10"``, ``"resnet18"``, ...).
        crop_size: side of the square crops fed to the classifier, in pixels.
        margin: (min, max) of the crop side over the object's longer side, drawn per crop.
        shift: largest shift of the crop centre, as a fraction of the object's width and height.
        views: jittered crops cut per object.
        background_per_image: crops per image that share with no object more than `background_overlap`
            of the smaller of the object's and the crop's area (class ``C``, "no object").
        epochs, batch_size, lr, weight_decay: AdamW with a one-cycle schedule.
        seed: the crops' jitter, the initialisation and the batch order.
    """

    backbone: str = "resnet10"
    crop_size: int = 32
    margin: tuple[float, float] = (1.1, 1.8)
    shift: float = 0.15
    views: int = 2
    background_per_image: int = 2
    background_overlap: float = 0.2
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    seed: int = 0

    def fingerprint(self, annotation_file: Path, image_dir: Path | None = None) -> str:
        """A short hash of the pre-training's version, every field, the annotation file's bytes and the size of
        every image it lists, with `image_dir` (sets that differ in their pixels only, as two digits sets with
        another noise level, have the same annotations; their PNG files differ in size)."""
        text = Path(annotation_file).read_bytes()
        digest = hashlib.sha256(f"pretrain v{PRETRAIN_VERSION}".encode())
        digest.update(text)
        digest.update(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        for image in json.loads(text).get("images", []) if image_dir is not None else []:
            file = Path(image_dir) / image["file_name"]
            digest.update(f"{image['file_name']}:{file.stat().st_size if file.is_file() else -1};".encode())
        return digest.hexdigest()[:12]


def _clipped_xywh(anns: list[dict], width: int, height: int) -> np.ndarray:
    """The annotations' boxes clipped to the image, as the detection dataset clips them."""
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    x0 = np.clip(xywh[:, :2], 0, [width, height])
    x1 = np.clip(xywh[:, :2] + xywh[:, 2:], 0, [width, height])
    return np.concatenate([x0, x1 - x0], axis=1)


def _object_windows(boxes: np.ndarray, config: PretrainConfig, rng: np.random.Generator) -> list[list[float]]:
    windows = []
    for box in boxes:  # xywh
        for _ in range(config.views):
            side = max(box[2], box[3]) * rng.uniform(*config.margin)
            centre = box[:2] + box[2:] * (0.5 + rng.uniform(-config.shift, config.shift, 2))
            windows.append([*(centre - side / 2).tolist(), side])
    return windows


def _background_windows(
    boxes: np.ndarray, width: int, height: int, config: PretrainConfig, rng: np.random.Generator
) -> list[list[float]]:
    windows = []
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    areas = boxes[:, 2] * boxes[:, 3]
    for _ in range(config.background_per_image):
        for _attempt in range(20):  # a crowded image may have no room: then fewer background crops
            side = rng.uniform(0.1, 0.5) * min(width, height)
            corner = rng.uniform(0, [width - side, height - side])
            overlap = np.clip(
                np.minimum(xyxy[:, 2:], corner + side) - np.maximum(xyxy[:, :2], corner), 0, None
            )
            if (overlap.prod(axis=1) <= config.background_overlap * np.minimum(areas, side * side)).all():
                windows.append([*corner.tolist(), side])
                break
    return windows


def _cut(image: Tensor, window: list[float], size: int) -> Tensor:
    x0, y0, side = window
    top, left, s = round(y0), round(x0), max(2, round(side))
    # Windows reaching past the border are padded with the image's edge, not with black.
    pad = max(0, -top, -left, top + s - image.shape[1], left + s - image.shape[2])
    if pad:
        image = F.pad(image[None].float(), (pad, pad, pad, pad), mode="replicate")[0].to(torch.uint8)
        top, left = top + pad, left + pad
    return TF.resized_crop(image, top, left, s, s, [size, size], antialias=True)


def object_crops(
    image_dir: str | os.PathLike, annotation_file: str | os.PathLike, config: PretrainConfig
) -> tuple[Tensor, Tensor, list[str]]:
    """Cut the training objects and some background out of a COCO-format split.

    Returns:
        ``(crops, labels, class_names)``: ``uint8 [N, 3, S, S]`` crops (``S`` = `crop_size`),
        ``int64 [N]`` labels in ``0..C`` (``C`` = background; classes in the order of sorted category ids).
    """
    data = json.loads(Path(annotation_file).read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0) and ann["bbox"][2] > 1 and ann["bbox"][3] > 1:
            by_image.setdefault(ann["image_id"], []).append(ann)
    rng = np.random.default_rng(config.seed)
    crops, labels = [], []
    for info in data["images"]:
        anns = by_image.get(info["id"], [])
        with Image.open(Path(image_dir) / info["file_name"]) as picture:
            image = TF.pil_to_tensor(picture.convert("RGB"))
        boxes = _clipped_xywh(anns, image.shape[2], image.shape[1])
        for ann, window in zip(np.repeat(anns, config.views), _object_windows(boxes, config, rng)):
            crops.append(_cut(image, window, config.crop_size))
            labels.append(label_of[ann["category_id"]])
        for window in _background_windows(boxes, image.shape[2], image.shape[1], config, rng):
            crops.append(_cut(image, window, config.crop_size))
            labels.append(len(categories))
    if not crops:
        raise ValueError(f"{annotation_file} has no images to cut objects from; check the annotation file")
    return torch.stack(crops), torch.tensor(labels), [c["name"] for c in categories]


def _normalise(crops: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (crops.float() / 255 - mean) / std


def train_classifier(crops: Tensor, labels: Tensor, config: PretrainConfig) -> tuple[torch.nn.Module, float]:
    """Train ``torchvision`` ResNet `config.backbone` on the crops; return it and its final train accuracy.

    Crops are never flipped (a mirrored digit is another shape); each crop's brightness and contrast are
    jittered, since the detector meets light and dark canvases.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net = _DEPTHS[config.backbone](weights=None, num_classes=int(labels.max()) + 1)
    steps_per_epoch = math.ceil(len(crops) / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
    )
    net.train()
    correct = 0
    for _epoch in range(config.epochs):
        order = torch.randperm(len(crops), generator=generator)
        correct = 0
        for start in range(0, len(crops), config.batch_size):
            index = order[start : start + config.batch_size]
            x = _normalise(crops[index])
            gain = 1 + 0.3 * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5)
            x = x * gain + 0.3 * (torch.rand(len(x), 1, 1, 1, generator=generator) - 0.5)
            logits = net(x)
            loss = F.cross_entropy(logits, labels[index], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels[index]).sum())
    return net, correct / len(crops)


def pretrain_backbone(
    image_dir: str | os.PathLike,
    annotation_file: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The state dict of a backbone pre-trained on the split's objects: built once, then read from the cache.

    Arguments:
        image_dir, annotation_file: a COCO-format *training* split (never the validation one).
        config: the :class:`PretrainConfig`; its `backbone` must be the detector's.
        cache_dir: where the weights are kept; default ``<digits cache>/../backbones``.

    Returns:
        The path of the saved state dict, for ``backbone_weights`` (``--model-arg
        backbone_weights=PATH``).
    """
    config = config or PretrainConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir().parent / "backbones"
    path = cache / f"{config.backbone}-{config.fingerprint(Path(annotation_file), Path(image_dir))}.pth"
    if path.is_file():
        return path
    start = time.perf_counter()
    crops, labels, _ = object_crops(image_dir, annotation_file, config)
    net, accuracy = train_classifier(crops, labels, config)
    logger.info(
        "pre-trained %s on %d crops in %.0fs (train accuracy %.3f)",
        config.backbone,
        len(crops),
        time.perf_counter() - start,
        accuracy,
    )
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".writing-", suffix=".pth", dir=cache)
    os.close(fd)
    try:
        torch.save(net.state_dict(), tmp)
        os.replace(tmp, path)  # atomic: a reader sees the old state (no file) or the whole file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
