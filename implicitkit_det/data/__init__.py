"""Detection data: COCO-format datasets, the bundled digits set, transforms and batching."""

from .batching import DetectionBatch, collate_detection, pad_images
from .coco import CocoDetectionDataset, CocoFormatError, finalize_target, load_coco_json
from .digits import (
    DigitsDetectionConfig,
    DigitsDetectionFiles,
    build_digits_detection,
    default_cache_dir,
    digits_detection_dataset,
)
from .grouping import GroupedBatchSampler, aspect_ratio_groups
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MULTI_SCALES,
    RandomSizeCrop,
    make_eval_transforms,
    make_train_transforms,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MULTI_SCALES",
    "CocoDetectionDataset",
    "CocoFormatError",
    "DetectionBatch",
    "DigitsDetectionConfig",
    "DigitsDetectionFiles",
    "GroupedBatchSampler",
    "RandomSizeCrop",
    "aspect_ratio_groups",
    "build_digits_detection",
    "collate_detection",
    "default_cache_dir",
    "digits_detection_dataset",
    "finalize_target",
    "load_coco_json",
    "make_eval_transforms",
    "make_train_transforms",
    "pad_images",
]
