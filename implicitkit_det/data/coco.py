"""COCO-format detection data on torchvision's ``CocoDetection`` with transforms-v2 targets.

The annotation file is read and checked once, when the dataset is built: a structural problem (corrupt
JSON, a missing key, an unknown image or category id, a duplicated id) is a :class:`CocoFormatError` that
names the file, the entry and the fix, while a box that cannot be learned from (non-positive size, or
nothing left after clipping to its image) is skipped with a logged warning and counted in
``dataset.skipped``. Crowd regions are left out of the training targets (COCO's evaluation treats them as
"ignore"). Every image is kept, including those without annotations, unless ``remove_empty`` asks to drop
the images with no box to learn from (the official training pipeline's ``filter_empty_gt``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .images import orientation_note, unreadable_mode

__all__ = ["CocoDetectionDataset", "CocoFormatError", "finalize_target", "load_coco_json"]

logger = logging.getLogger(__name__)

# Per-entry warnings stop after this many; a summary line gives the total.
_MAX_ENTRY_WARNINGS = 10


class CocoFormatError(ValueError):
    """A COCO annotation file (or an image it lists) does not have the structure this loader needs."""


def load_coco_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO annotation file, with errors that name the file.

    Arguments:
        ann_file: path of an ``instances_*.json`` file.

    Returns:
        The parsed dict, with ``annotations`` defaulting to ``[]`` (image-info-only files).

    Raises:
        ``FileNotFoundError`` when the file does not exist; :class:`CocoFormatError` when it is not
        valid JSON or lacks the ``images`` / ``categories`` lists.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"COCO annotation file {path} does not exist. Pass the path of an instances_*.json file."
        )
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CocoFormatError(
            f"{path} is not valid JSON ({err}). The file is truncated or corrupt: download or regenerate it."
        ) from err
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{path}: the top level is a {type(data).__name__}, expected an object with 'images', "
            "'annotations' and 'categories'. Is this a results file rather than an annotation file?"
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: missing list '{key}'; a COCO detection file needs one.")
    data.setdefault("annotations", [])
    if not isinstance(data["annotations"], list):
        raise CocoFormatError(f"{path}: 'annotations' must be a list.")
    return data


def _is_integer(value: Any) -> bool:
    """An int of JSON (not a bool, which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    """An integer, or a float with an integer value (640.0)."""
    return _is_integer(value) or (isinstance(value, float) and value.is_integer())


def _numbered_from_one(annotations: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """`annotations` with ids 1..N if any id is below 1: COCO's matching records a match by the ground
    truth's id and reads 0 as "unmatched", so an annotation with id 0 could never be found."""
    if all(ann["id"] >= 1 for ann in annotations):
        return annotations
    logger.info(
        "%s: annotation ids start below 1; the evaluation's copy (dataset.coco) numbers them 1..%d in file "
        "order, as COCO's matching reads id 0 as unmatched.",
        path,
        len(annotations),
    )
    return [{**ann, "id": i} for i, ann in enumerate(annotations, start=1)]


def _require(entry: Any, keys: tuple[str, ...], where: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: {where} is a {type(entry).__name__}, expected an object.")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise CocoFormatError(f"{path}: {where} lacks the key(s) {missing}; add them or remove the entry.")


class CocoDetectionDataset(torchvision.datasets.CocoDetection):
    """A COCO-format detection dataset returning ``(image, target)`` ready for DETR-style training.

    Category ids (any integers) are mapped to contiguous labels ``0..C-1`` in increasing id order;
    ``label_to_category_id`` maps back for evaluation. Boxes are converted from COCO ``xywh`` to ``xyxy`` and
    clipped to the image.

    A sample is ``(image, target)`` where, after ``transforms``, ``target`` holds (see
    :func:`finalize_target`): ``boxes`` [M, 4] xyxy pixels of the transformed image, ``boxes_normalized``
    [M, 4] = boxes / (w, h, w, h), ``labels`` [M] int64, ``image_id`` (int), ``orig_size`` and ``size``
    (int64 (h, w) before / after the transforms). Without ``transforms`` the image is the decoded uint8
    ``[3, H, W]`` tensor.

    Arguments:
        root: folder the images' ``file_name`` entries are relative to.
        ann_file: the COCO ``instances_*.json`` file.
        transforms: a transforms-v2 callable taking and returning ``(image, target)``, where the target
            has ``boxes`` as ``tv_tensors.BoundingBoxes`` and ``labels``; see
            :mod:`implicitkit_det.data.transforms`.
        remove_empty: leave out the images without a box to learn from (none annotated, or every box crowd
            or skipped), as the official training pipeline does. For training sets only: an evaluation must
            see
            every image. mmdetection's ``filter_empty_gt`` keeps an image whose only annotations are crowd
            regions; here it is left out too, since its target would be empty.

    Attributes:
        coco: a ``pycocotools`` ``COCO`` index of the file minus the skipped annotations (what the
            evaluator scores against); crowd annotations are kept there, as COCO evaluation expects.
        skipped: counts ``{"degenerate", "outside_image"}`` of annotations dropped, and ``crowd`` of crowd
            regions left out of the training targets.
        clipped: the boxes kept that extend more than a pixel past their image (warned of at load): training
            sees them clipped, the evaluation as the file has them, as COCO's own evaluation does.
        category_ids, category_names: per contiguous label.
        removed_empty: the number of images `remove_empty` left out (0 without it).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        *,
        remove_empty: bool = False,
    ) -> None:
        # torchvision's __init__ would re-read the file with no checks; set up the VisionDataset part only.
        torchvision.datasets.VisionDataset.__init__(self, root, transforms=transforms)
        from pycocotools.coco import COCO

        self.ann_file = Path(ann_file)
        data = load_coco_json(self.ann_file)
        kept = self._index(data)

        self.coco = COCO()
        self.coco.dataset = {**data, "annotations": _numbered_from_one(kept, self.ann_file)}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        self.ids = sorted(self._images)
        if remove_empty:
            kept_ids = [i for i in self.ids if len(self._boxes[i])]
            self.removed_empty = len(self.ids) - len(kept_ids)
            self.ids = kept_ids
        else:
            self.removed_empty = 0

    # ----------------------------------------------------------------------------------------------------
    # Reading and checking the annotation file.
    def _index(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """Check the file, build the label map and per-image targets; return the annotations kept."""
        self._index_images(data["images"])
        self._index_categories(data["categories"])
        return self._index_annotations(data["annotations"])

    def _index_images(self, images: list[Any]) -> None:
        path = self.ann_file
        self._images: dict[int, dict[str, Any]] = {}
        for i, img in enumerate(images):
            _require(img, ("id", "file_name", "width", "height"), f"images[{i}]", path)
            if not _is_integer(img["id"]):
                # COCO's ids are integers; the evaluator and the samples' image_id rely on it.
                raise CocoFormatError(
                    f"{path}: images[{i}] has id {img['id']!r} ({type(img['id']).__name__}); COCO image ids are "
                    "integers: number the images and refer to them by those numbers in the annotations."
                )
            if img["id"] in self._images:
                raise CocoFormatError(
                    f"{path}: image id {img['id']} appears twice; image ids must be unique."
                )
            if not all(_is_whole(img[k]) and img[k] > 0 for k in ("width", "height")):
                raise CocoFormatError(
                    f"{path}: image id {img['id']} has size {img['width']!r}x{img['height']!r}; "
                    "width and height must be positive integers, the image's size in pixels."
                )
            self._images[img["id"]] = img

    def _index_categories(self, categories: list[Any]) -> None:
        path = self.ann_file
        cat_ids: list[int] = []
        names: dict[int, str] = {}
        for i, cat in enumerate(categories):
            _require(cat, ("id",), f"categories[{i}]", path)
            if not _is_integer(cat["id"]):
                raise CocoFormatError(
                    f"{path}: categories[{i}] has id {cat['id']!r} ({type(cat['id']).__name__}); COCO category "
                    "ids are integers (results name their category by it): number the categories and refer to "
                    "them by those numbers in the annotations."
                )
            if cat["id"] in names:
                raise CocoFormatError(f"{path}: category id {cat['id']} appears twice; ids must be unique.")
            name = str(cat.get("name", cat["id"]))
            if name in names.values():
                first = next(c for c, n in names.items() if n == name)
                raise CocoFormatError(
                    f"{path}: categories {first} and {cat['id']} are both named {name!r}; names must be unique "
                    "(per-class AP is reported by name)."
                )
            names[cat["id"]] = name
            cat_ids.append(cat["id"])
        self.category_ids: list[int] = sorted(cat_ids)
        self.category_names: list[str] = [names[c] for c in self.category_ids]
        self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}

    def _index_annotations(self, annotations: list[Any]) -> list[dict[str, Any]]:
        path = self.ann_file
        self.skipped: dict[str, int] = {"degenerate": 0, "outside_image": 0, "crowd": 0}
        self.clipped = 0
        boxes: dict[int, list[list[float]]] = {i: [] for i in self._images}
        labels: dict[int, list[int]] = {i: [] for i in self._images}
        seen_ann_ids: set[Any] = set()
        kept: list[dict[str, Any]] = []
        for i, ann in enumerate(annotations):
            self._check_annotation(ann, i, seen_ann_ids)
            aid, iid, cid, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                self._skip("degenerate", f"annotation id {aid} (image id {iid}) has a box of size {w}x{h}")
                continue
            img = self._images[iid]
            x0, y0 = min(max(x, 0.0), img["width"]), min(max(y, 0.0), img["height"])
            x1, y1 = min(max(x + w, 0.0), img["width"]), min(max(y + h, 0.0), img["height"])
            if x1 <= x0 or y1 <= y0:
                self._skip(
                    "outside_image",
                    f"annotation id {aid} (image id {iid}) box {bbox} lies outside its "
                    f"{img['width']}x{img['height']} image",
                )
                continue
            kept.append(ann)
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
                continue
            if max(x0 - x, y0 - y, x + w - x1, y + h - y1) > 1.0:
                self.clipped += 1
            boxes[iid].append([x0, y0, x1, y1])
            labels[iid].append(self.category_id_to_label[cid])

        if self.clipped:
            logger.warning(
                "%s: %d boxes extend more than a pixel past their image. Training learns them clipped to the "
                "image, while the evaluation scores against them as the file has them (as COCO's own does), "
                "so a detector that predicts them clipped loses AP there: clip them in the file to score "
                "against what the model can see.",
                path,
                self.clipped,
            )
        n_bad = self.skipped["degenerate"] + self.skipped["outside_image"]
        if n_bad > _MAX_ENTRY_WARNINGS:
            logger.warning("%s: skipped %d unusable boxes in all (counts: %s).", path, n_bad, self.skipped)
        self._boxes = {i: np.asarray(b, dtype=np.float32).reshape(-1, 4) for i, b in boxes.items()}
        self._labels = {i: np.asarray(v, dtype=np.int64) for i, v in labels.items()}
        return kept

    def _check_annotation(self, ann: Any, index: int, seen_ann_ids: set[Any]) -> None:
        """Refuse an annotation without its keys, with a repeated id, or naming an unknown image or
        category, or whose bbox is not four finite numbers; records its id in `seen_ann_ids`."""
        path = self.ann_file
        _require(ann, ("id", "image_id", "category_id", "bbox"), f"annotations[{index}]", path)
        aid, iid, cid, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
        if not _is_integer(aid):
            raise CocoFormatError(
                f"{path}: annotations[{index}] has id {aid!r} ({type(aid).__name__}); COCO annotation ids are "
                "integers (the evaluation records matches by them): number the annotations."
            )
        if aid in seen_ann_ids:
            raise CocoFormatError(
                f"{path}: annotation id {aid} appears twice; annotation ids must be unique "
                "(COCO evaluation indexes annotations by id)."
            )
        seen_ann_ids.add(aid)
        if iid not in self._images:
            raise CocoFormatError(
                f"{path}: annotation id {aid} refers to image id {iid}, which is not in 'images'. "
                "Add the image or remove the annotation."
            )
        if cid not in self.category_id_to_label:
            raise CocoFormatError(
                f"{path}: annotation id {aid} (image id {iid}) has category id {cid}, which is not in "
                f"'categories' (known ids: {self.category_ids}). Add the category or fix the annotation."
            )
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise CocoFormatError(
                f"{path}: annotation id {aid} (image id {iid}) has bbox {bbox!r}; expected four finite "
                "numbers [x, y, width, height]."
            )

    def _skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        n = self.skipped["degenerate"] + self.skipped["outside_image"]
        if n <= _MAX_ENTRY_WARNINGS:
            logger.warning(
                "%s: %s; skipped (counted in dataset.skipped[%r]). Fix or remove the annotation to silence "
                "this warning.",
                self.ann_file,
                what,
                reason,
            )

    # ----------------------------------------------------------------------------------------------------
    # Samples.
    @property
    def num_classes(self) -> int:
        """Number of contiguous labels ``C``."""
        return len(self.category_ids)

    @property
    def num_boxes(self) -> int:
        """The boxes the targets hold, over every image (crowd and unusable annotations excluded)."""
        return sum(len(boxes) for boxes in self._boxes.values())

    @property
    def aspect_ratios(self) -> list[float]:
        """``width / height`` of every sample's stored image, in sample order (for batch grouping)."""
        return [self._images[i]["width"] / self._images[i]["height"] for i in self.ids]

    @property
    def label_to_category_id(self) -> list[int]:
        """``label_to_category_id[label]`` is the file's category id of a contiguous label."""
        return list(self.category_ids)

    def image_entry(self, id: int) -> dict[str, Any]:
        """The annotation file's entry of image `id`: ``file_name``, ``width``, ``height``, ..."""
        return self._images[id]

    def _load_image(self, id: int) -> tv_tensors.Image:
        info = self._images[id]
        path = os.path.join(self.root, info["file_name"])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Image id {id} of {self.ann_file} is {info['file_name']!r}, but {path} does not exist. "
                "Check that the image folder (root) matches the annotation file."
            )
        try:
            with Image.open(path) as pil:
                if (why := unreadable_mode(pil)) is not None:
                    raise CocoFormatError(f"Image id {id}: {path} {why}.")
                if pil.size != (info["width"], info["height"]):  # the EXIF is read only then
                    note = orientation_note(pil, info["width"], info["height"])
                    raise CocoFormatError(
                        f"Image id {id}: {path} is {pil.size[0]}x{pil.size[1]} but {self.ann_file} says "
                        f"{info['width']}x{info['height']}; its boxes would be wrong."
                        + (note or " Fix the 'width'/'height' entry of the image.")
                    )
                return F.to_image(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise CocoFormatError(
                f"Image id {id}: cannot decode {path} ({err}); the file is corrupt."
            ) from err

    def _load_target(self, id: int) -> dict[str, Any]:
        info = self._images[id]
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(self._boxes[id]), format="XYXY", canvas_size=(info["height"], info["width"])
            ),
            "labels": torch.from_numpy(self._labels[id]),
            "image_id": id,
        }

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        target = self._load_target(image_id)
        orig_size = tuple(image.shape[-2:])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, finalize_target(image, target, orig_size)


def finalize_target(
    image: torch.Tensor, target: Mapping[str, Any], orig_size: tuple[int, int]
) -> dict[str, Any]:
    """Turn a transformed target into the plain-tensor dict the matcher and criterion read.

    Arguments:
        image: the transformed image ``[3, h, w]``.
        target: a dict with ``boxes`` (``BoundingBoxes``, xyxy), ``labels`` and ``image_id``.
        orig_size: ``(H, W)`` of the image as stored.

    Returns:
        ``{boxes, boxes_normalized, labels, image_id, orig_size, size}`` with
        ``boxes_normalized = boxes / (w, h, w, h)``, boxes clipped to the ``(h, w)`` image.
    """
    h, w = image.shape[-2:]
    boxes = torchvision.ops.clip_boxes_to_image(target["boxes"].as_subclass(torch.Tensor).float(), (h, w))
    scale = torch.tensor([w, h, w, h], dtype=boxes.dtype)
    return {
        "boxes": boxes,
        "boxes_normalized": boxes / scale,
        "labels": target["labels"].as_subclass(torch.Tensor).long(),
        "image_id": int(target["image_id"]),
        "orig_size": torch.tensor(orig_size, dtype=torch.int64),
        "size": torch.tensor([h, w], dtype=torch.int64),
    }
