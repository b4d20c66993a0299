"""implicitkit_det: deep-equilibrium object detection (DEQDet, AdaMixer, Sparse R-CNN) on implicitkit.

The subpackages follow the usual split of a detection code base: ``data`` (COCO-format datasets, the
bundled digits set, transforms, batching), ``losses`` (matcher, set criterion), ``evaluation``
(post-processing, COCO evaluator) and ``distributed`` (helpers that work without a process group).
"""

from .data import (
    CocoDetectionDataset,
    CocoFormatError,
    DetectionBatch,
    DigitsDetectionConfig,
    build_digits_detection,
    collate_detection,
    digits_detection_dataset,
    make_eval_transforms,
    make_train_transforms,
)
from .evaluation import CocoEvaluator, PostProcess, to_coco_results
from .losses import HungarianMatcher, SetCriterion

__all__ = [
    "CocoDetectionDataset",
    "CocoEvaluator",
    "CocoFormatError",
    "DetectionBatch",
    "DigitsDetectionConfig",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "build_digits_detection",
    "collate_detection",
    "digits_detection_dataset",
    "make_eval_transforms",
    "make_train_transforms",
    "to_coco_results",
]
