"""COCO box evaluation with two interchangeable backends: faster-coco-eval (default) and pycocotools.

Both backends implement the same COCO protocol (101-point interpolated precision, IoU thresholds
0.50:0.05:0.95, area ranges small < 32^2 <= medium < 96^2 <= large, at most 1/10/100 detections per image)
and give the same numbers; faster-coco-eval does the matching in C++. A stat that is undefined for the
evaluated images (no ground truth in that area range) is -1, as in COCO's own tools.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ..collectives import broadcast_object, gather_object, get_rank

__all__ = ["STAT_NAMES", "CocoEvaluator", "format_summary"]

logger = logging.getLogger(__name__)

#: The 12 COCO box stats, in COCO's order.
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
_STAT_LABELS = (
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
    "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
)
Backend = Literal["faster_coco_eval", "pycocotools"]
_RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


class CocoEvaluator:
    """Collect COCO box results over an evaluation run and score them.

    Typical use: ``update(results, image_ids)`` per batch, then ``synchronize()`` and ``summarize()`` once.
    Results of an image already seen are ignored (a distributed sampler pads its last batch by repeating
    images), both within a process and, after ``synchronize``, across processes; within a process, a repeat
    that brings other results than those kept (an image's detections split over two calls) is warned of.
    A result whose box or score is not finite is refused (pycocotools would score a NaN box as a match).

    Which images are scored: those passed as ``image_ids`` to :meth:`update` (together with any image that
    has results) when ``image_ids`` was ever given; otherwise every image of the ground truth, so an image
    the model was never run on counts as a miss rather than silently vanishing from the score.

    Arguments:
        coco_gt: the ground truth: a ``COCO`` object of either library (e.g. ``dataset.coco``), a COCO dict,
            or the path of an annotation file.
        backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"`` (the reference implementation).
    """

    def __init__(self, coco_gt: Any, backend: Backend = "faster_coco_eval") -> None:
        if backend not in ("faster_coco_eval", "pycocotools"):
            raise ValueError(f"backend must be 'faster_coco_eval' or 'pycocotools', got {backend!r}")
        self.backend = backend
        self._gt = _gt_dict(coco_gt)
        self._image_ids = {img["id"] for img in self._gt["images"]}
        self._category_ids = sorted(c["id"] for c in self._gt["categories"])
        self._category_names = {c["id"]: str(c.get("name", c["id"])) for c in self._gt["categories"]}
        self.reset()

    def reset(self) -> None:
        """Forget every result collected so far."""
        self._per_image: dict[int, list[dict[str, Any]]] = {}
        self._restricted = False
        self.duplicates = 0

    @property
    def num_images(self) -> int:
        """Images with collected results (or declared through ``image_ids``) on this process."""
        return len(self._per_image)

    def update(self, results: Iterable[Mapping[str, Any]], image_ids: Iterable[int] | None = None) -> None:
        """Add COCO result dicts ``{image_id, category_id, bbox: [x, y, w, h], score}``.

        Arguments:
            results: the detections of a batch, in original-image pixels and the file's category ids
                (see :func:`~implicitkit_det.evaluation.postprocess.to_coco_results`).
            image_ids: the images the batch covered, including any without detections; restricts the
                evaluation to the images declared this way.
        """
        groups: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            missing = [k for k in _RESULT_KEYS if k not in r]
            if missing:
                raise ValueError(f"result {dict(r)!r} lacks {missing}; results need keys {_RESULT_KEYS}")
            if r["category_id"] not in self._category_names:
                raise ValueError(
                    f"result for image id {r['image_id']} has category id {r['category_id']}, which is not a "
                    f"ground-truth category ({self._category_ids}). Map contiguous labels to category ids "
                    "with the dataset's label_to_category_id."
                )
            bbox = [float(v) for v in r["bbox"]]
            score = float(r["score"])
            if len(bbox) != 4 or not all(map(math.isfinite, [*bbox, score])):
                # pycocotools scores a NaN box as a match, faster-coco-eval as a miss: refuse it instead.
                raise ValueError(
                    f"result for image id {r['image_id']} has bbox {r['bbox']} and score {r['score']}: a bbox "
                    "is four finite numbers [x, y, w, h] and a score is finite. A NaN or infinite box comes "
                    "from a diverged model: evaluate a checkpoint from before it diverged."
                )
            groups.setdefault(int(r["image_id"]), []).append(
                {
                    "image_id": int(r["image_id"]),
                    "category_id": r["category_id"],
                    "bbox": bbox,
                    "score": score,
                }
            )
        ids = list(groups)
        if image_ids is not None:
            self._restricted = True
            ids = [int(i) for i in image_ids] + ids
        for image_id in dict.fromkeys(ids):
            if image_id not in self._image_ids:
                raise ValueError(f"image id {image_id} is not in the ground truth; results must use its ids.")
            if image_id in self._per_image:
                self.duplicates += 1
                if groups.get(image_id, []) != self._per_image[image_id]:
                    warnings.warn(
                        f"image id {image_id} was given again with other results; the first ones are kept (a "
                        "repeated image is how a distributed sampler pads its last batch). Give all of an "
                        "image's detections in one update() call.",
                        stacklevel=2,
                    )
                continue
            self._per_image[image_id] = groups.get(image_id, [])

    def synchronize(self) -> None:
        """Gather every process's results onto rank 0, keeping the first copy of a repeated image.

        A no-op without a process group. Afterwards the other ranks hold no results.
        """
        gathered = gather_object((self._per_image, self._restricted, self.duplicates), dst=0)
        if gathered is None:
            self._per_image = {}
            return
        merged: dict[int, list[dict[str, Any]]] = {}
        duplicates = 0
        for per_image, _, dup in gathered:
            duplicates += dup
            for image_id, res in per_image.items():
                if image_id in merged:
                    duplicates += 1
                else:
                    merged[image_id] = res
        self._per_image = merged
        self._restricted = any(restricted for _, restricted, _ in gathered)
        self.duplicates = duplicates

    def summarize(self, verbose: bool = True) -> dict[str, Any]:
        """Score the collected results (on rank 0; every rank receives the same dict).

        Arguments:
            verbose: print the usual COCO table and per-class AP on rank 0.

        Returns:
            The 12 COCO stats by name (:data:`STAT_NAMES`) and ``per_class_AP``, a dict from
            category name to AP@[0.50:0.95] (-1 for a category without ground truth in the scored images).
        """
        summary = None
        if get_rank() == 0:
            summary = self._evaluate()
            if verbose:
                print(format_summary(summary))
        return broadcast_object(summary, src=0)

    # ----------------------------------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, Any]:
        img_ids = sorted(self._per_image) if self._restricted else sorted(self._image_ids)
        results = [r for image_id in sorted(self._per_image) for r in self._per_image[image_id]]
        if not self._restricted:
            with_objects = {a["image_id"] for a in self._gt["annotations"] if not a.get("iscrowd", 0)}
            missed = len(with_objects - self._per_image.keys())
            if missed:
                logger.warning(
                    "%d of %d ground-truth images with objects have no results, so their objects count as "
                    "misses; pass image_ids to CocoEvaluator.update to score only the images that were run.",
                    missed,
                    len(with_objects),
                )
        if not img_ids:
            stats, precision = np.full(12, -1.0), None
        elif self.backend == "pycocotools":
            stats, precision = _run_pycocotools(self._gt, results, img_ids)
        else:
            stats, precision = _run_faster_coco_eval(self._gt, results, img_ids)

        summary: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES, stats, strict=True)}
        per_class = {}
        for k, cat_id in enumerate(self._category_ids):
            ap = -1.0
            if precision is not None:
                p = precision[:, :, k, 0, -1]  # [iou thresholds, recall points] at area "all", 100 dets
                ap = float(p[p > -1].mean()) if (p > -1).any() else -1.0
            per_class[self._category_names[cat_id]] = ap
        summary["per_class_AP"] = per_class
        return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The 12 COCO lines followed by a per-class AP table (``n/a`` for undefined values)."""

    def fmt(v: float) -> str:
        return "  n/a" if v < 0 or math.isnan(v) else f"{v:0.3f}"

    lines = [f" {label} = {fmt(summary[name])}" for label, name in zip(_STAT_LABELS, STAT_NAMES, strict=True)]
    per_class = summary.get("per_class_AP", {})
    if per_class:
        width = max(8, *(len(n) for n in per_class))
        lines.append(f" {'category':<{width}} | AP@[.50:.95]")
        lines.append(f" {'-' * width}-+-------------")
        lines.extend(f" {name:<{width}} | {fmt(ap)}" for name, ap in per_class.items())
    return "\n".join(lines)


def _gt_dict(coco_gt: Any) -> dict[str, Any]:
    if isinstance(coco_gt, (str, os.PathLike)):
        from ..data.coco import load_coco_json

        data = load_coco_json(coco_gt)
    elif isinstance(coco_gt, Mapping):
        data = dict(coco_gt)
    elif hasattr(coco_gt, "dataset") and isinstance(coco_gt.dataset, Mapping):
        data = dict(coco_gt.dataset)
    else:
        raise TypeError(f"coco_gt must be a COCO object, a COCO dict or a path, got {type(coco_gt).__name__}")
    for key in ("images", "categories"):
        if key not in data:
            raise ValueError(f"the ground truth has no '{key}' list; is it a COCO annotation file?")
    data.setdefault("annotations", [])
    return data


def _fresh_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    # Both backends write keys ("ignore", ...) into the annotation dicts: give them copies. pycocotools
    # also needs "area" and "iscrowd", which some hand-made files leave out; use COCO's defaults.
    annotations = []
    for a in gt["annotations"]:
        a = dict(a)
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(a["bbox"][2]) * float(a["bbox"][3])
        annotations.append(a)
    return {**gt, "images": [dict(i) for i in gt["images"]], "annotations": annotations}


def _run_pycocotools(
    gt: Mapping[str, Any], results: Sequence[dict[str, Any]], img_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the table itself
        coco_gt = COCO()
        coco_gt.dataset = _fresh_gt(gt)
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])
        else:  # loadRes reads results[0] and fails on an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": gt["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64), ev.eval["precision"]


def _run_faster_coco_eval(
    gt: Mapping[str, Any], results: Sequence[dict[str, Any]], img_ids: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*args: Any, **kwargs: Any) -> None:
        return None

    coco_gt = COCO(_fresh_gt(gt), print_function=quiet)
    coco_dt = coco_gt.loadRes([dict(r) for r in results])  # handles an empty list
    ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
    ev.params.imgIds = img_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64), np.asarray(ev.eval["precision"])
