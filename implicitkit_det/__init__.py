"""implicitkit_det: deep-equilibrium object detection (DEQDet, AdaMixer, Sparse R-CNN) on implicitkit.

The subpackages follow the usual split of a detection code base: ``data`` (COCO-format datasets, the
bundled digits set, transforms, batching), ``losses`` (matcher, set criterion), ``evaluation``
(post-processing, COCO evaluator), ``models`` (DEQDet, AdaMixer, Sparse R-CNN, DEQ Sparse R-CNN, ``build_model``) and ``collectives`` (collective operations that work without a process group).
"""

# One version for the distribution that ships both packages.
from implicitkit import __version__ as __version__

# What the detection extra installs (`pip install "implicitkit[det]"`): a plain `pip install implicitkit`
# brings the core library only.
_DET_EXTRA = {
    "torchvision",
    "pycocotools",
    "faster_coco_eval",
    "sklearn",
    "PIL",
    "matplotlib",
    "numpy",
    "scipy",
    "tqdm",
}

try:
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
    from .models import CONFIGS, AdaMixer, DEQDet, DEQSparseRCNN, SparseRCNN, build_model
except ModuleNotFoundError as missing:
    if (missing.name or "").partition(".")[0] not in _DET_EXTRA:
        raise
    raise ModuleNotFoundError(
        f"implicitkit_det needs {missing.name!r}, which the detection extra installs: "
        "pip install 'implicitkit[det]' (the core library, implicitkit, does without it)",
        name=missing.name,
    ) from missing

__all__ = [
    "CONFIGS",
    "AdaMixer",
    "CocoDetectionDataset",
    "CocoEvaluator",
    "CocoFormatError",
    "DEQDet",
    "DEQSparseRCNN",
    "DetectionBatch",
    "DigitsDetectionConfig",
    "HungarianMatcher",
    "PostProcess",
    "SetCriterion",
    "SparseRCNN",
    "build_digits_detection",
    "build_model",
    "collate_detection",
    "digits_detection_dataset",
    "make_eval_transforms",
    "make_train_transforms",
    "to_coco_results",
]
