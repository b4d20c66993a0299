"""Predictions a person can look at: load a trained detector, run it on images, draw its boxes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid

from ..data import make_eval_transforms, pad_images
from ..data.images import unreadable_mode
from ..models import build_model
from ..models.registry import read_overrides, without_weight_files
from .checkpoint import load_checkpoint, read_checkpoint
from .run_config import test_settings_of

__all__ = [
    "Detector",
    "detect",
    "draw_detections",
    "load_detector",
    "predict_files",
    "save_grid",
    "save_prediction_grid",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class Detector:
    """A trained detector with what it needs to run on raw images.

    Attributes:
        model: the detector, in evaluation mode.
        image_size, max_size: the evaluation resize (shorter side, longer side at most).
        class_names: one name per label, or ``None`` when the checkpoint has none.
        device: where the model runs.
    """

    model: nn.Module
    image_size: int
    max_size: int | None
    class_names: list[str] | None
    device: torch.device


def load_detector(
    checkpoint: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
    max_size: int | None = None,
    test_steps: int | None = None,
) -> Detector:
    """Build the model a checkpoint was trained with, load its weights, and read its input size.

    A DEQ detector runs with the run's test-time settings (``--deq-steps``, ``--deq-tol``, ``--deq-solver``),
    as its evaluation did.

    Arguments:
        checkpoint: a checkpoint written by a training run (``checkpoint_last.pth``, ``checkpoint_best.pth``),
            or its run folder.
        device: where to run it.
        image_size, max_size: the evaluation resize; default the training run's.
        test_steps: a DEQ detector's refinement steps (the most, with a tolerance); default the run's.
    """
    state = read_checkpoint(checkpoint)
    config = state.get("config") or {}
    if "name" not in config or "num_classes" not in config:
        raise ValueError(f"{checkpoint} holds no model config; it was not written by this project's training")
    # A run's options may serve every detector: build with those this one reads.
    overrides, _ = read_overrides(config["name"], config.get("overrides", {}))
    # The checkpoint's weights replace the pre-trained ones: the backbone's file need not exist here.
    model = build_model(
        config["name"], config["num_classes"], **without_weight_files(config["name"], overrides)
    )
    load_checkpoint(state, model=model)
    # Checkpoints from before the model record kept them: the run's options hold the same values.
    settings = config.get("test_settings", test_settings_of(state.get("args") or {}))
    if settings.get("test_solver") == "anderson" and settings.get("test_tol") is None:
        # Older runs could save anderson without a tolerance: F ran test_steps times, no solver, as here.
        settings = {**settings, "test_solver": "fixed"}
    if test_steps is not None:
        if "test_steps" not in model.test_settings:
            raise ValueError(
                f"test_steps (--deq-steps) {test_steps}: {config['name']} is not a DEQ detector, it has no "
                "test-time step count; drop it"
            )
        settings = {**settings, "test_steps": test_steps}
    model.configure_test(**settings)
    saved_size, saved_max = config.get("input_size") or (None, None)
    if (image_size or saved_size) is None:
        raise ValueError(f"{checkpoint} does not record its input size; pass image_size= (and max_size=)")
    return Detector(
        model=model.to(device).eval(),
        image_size=image_size or saved_size,
        max_size=max_size or saved_max,
        class_names=config.get("class_names"),
        device=torch.device(device),
    )


@torch.no_grad()
def detect(detector: Detector, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
    """Detections for each ``uint8`` image ``[3, H, W]``, boxes in that image's pixels (xyxy).

    Each image is resized, normalised and padded like the evaluation data (to a multiple of 32, the
    coarsest stride), run alone, and its boxes are scaled back to the image given: the detections equal
    those the evaluation scores for that image at batch size 1.
    """
    transform = make_eval_transforms(size=detector.image_size, max_size=detector.max_size)
    out = []
    for image in images:
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"detect takes uint8 RGB images [3, H, W], got {image.dtype} {tuple(image.shape)}"
            )
        x = transform(image)
        batch, mask = pad_images([x], size_divisor=32)
        (det,) = detector.model(batch.to(detector.device), mask=mask.to(detector.device))
        (h, w), (oh, ow) = x.shape[-2:], image.shape[-2:]
        scale = det["boxes"].new_tensor([ow / w, oh / h, ow / w, oh / h])
        out.append({k: v.cpu() for k, v in {**det, "boxes": det["boxes"] * scale}.items()})
    return out


def draw_detections(
    image: Tensor,
    detections: Mapping[str, Tensor],
    *,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    color: str | None = None,
) -> Tensor:
    """The image with each detection scoring at least ``score_threshold`` drawn: box, label and score.

    Ground truth can be drawn the same way from ``{"boxes", "labels"}`` (no scores: every box is drawn).
    """
    scores = detections.get("scores")
    keep = (
        scores >= score_threshold
        if scores is not None
        else torch.ones(len(detections["boxes"]), dtype=torch.bool)
    )
    if not bool(keep.any()):
        return image.clone()
    boxes, labels = detections["boxes"][keep].float(), detections["labels"][keep].tolist()
    names = [class_names[i] if class_names is not None else str(i) for i in labels]
    if scores is not None:
        names = [f"{n} {s:.2f}" for n, s in zip(names, scores[keep].tolist(), strict=True)]
    palette = color or [_PALETTE[i % len(_PALETTE)] for i in labels]
    return draw_bounding_boxes(image, boxes, names, colors=palette, width=2)


_PALETTE = ["red", "lime", "blue", "orange", "magenta", "cyan", "yellow", "white", "pink", "springgreen"]


def save_grid(images: Sequence[Tensor], path: str | os.PathLike, *, columns: int = 4) -> Path:
    """Write ``uint8`` images of possibly different sizes as one PNG grid (each padded to the largest)."""
    height = max(i.shape[1] for i in images)
    width = max(i.shape[2] for i in images)
    padded = [torch.nn.functional.pad(i, (0, width - i.shape[2], 0, height - i.shape[1])) for i in images]
    grid = make_grid(torch.stack(padded), nrow=columns, padding=4, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(grid, path)
    return path


def read_rgb(path: str | os.PathLike) -> Tensor:
    """An image file as ``uint8`` RGB ``[3, H, W]`` (read with PIL, as the datasets read them)."""
    with Image.open(path) as image:
        if (why := unreadable_mode(image)) is not None:
            raise ValueError(f"{path} {why}.")
        return pil_to_tensor(image.convert("RGB"))


def write_png(image: Tensor, path: str | os.PathLike) -> None:
    """Write a ``uint8`` ``[3, H, W]`` image as PNG."""
    to_pil_image(image).save(path, format="PNG")


def image_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named, and those directly inside the folders named, sorted within each folder."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            entries = sorted(p for p in item.iterdir() if not p.name.startswith("."))
            images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            files += images
            if left_out := sorted(set(entries) - set(images)):
                warnings.warn(_left_out(item, left_out), stacklevel=2)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {[str(i) for i in inputs]}")
    return files


def _left_out(folder: Path, entries: list[Path]) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in entries]
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return (
        f"{folder}: left out {len(names)} entries that are not {'/'.join(IMAGE_SUFFIXES)} files (subfolders are "
        f"not searched): {shown}; name such a file or folder itself to read it"
    )


def predict_files(
    checkpoint: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    score_threshold: float = 0.3,
    device: str = "cpu",
    test_steps: int | None = None,
) -> list[dict[str, Any]]:
    """Run a checkpoint on image files or folders and write one PNG per image with its detections drawn.

    `test_steps`: a DEQ detector's refinement steps, default the run's (:func:`load_detector`).

    Returns:
        Per image: ``{"image", "output", "detections"}`` (the drawn file and the kept detections).
    """
    out_dir = Path(out_dir)
    files = image_files(inputs)
    outputs = [out_dir / f"{file.stem}.png" for file in files]
    first: dict[Path, Path] = {}
    inputs_resolved = {file.resolve() for file in files}
    for file, output in zip(files, outputs, strict=True):
        if output.resolve() in inputs_resolved:
            raise ValueError(
                f"drawing {file} to {output} would overwrite the input image {output}; give --out a folder "
                "other than the images'"
            )
        if (earlier := first.setdefault(output, file)) != file:
            raise ValueError(
                f"{earlier} and {file} would both be drawn to {output}; predict them into separate output "
                "folders, or rename one"
            )
    _refuse_unreadable(files)
    detector = load_detector(checkpoint, device=device, test_steps=test_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for file, output in zip(files, outputs, strict=True):
        image = read_rgb(file)
        (det,) = detect(detector, [image])
        drawn = draw_detections(image, det, class_names=detector.class_names, score_threshold=score_threshold)
        write_png(drawn, output)
        keep = det["scores"] >= score_threshold
        results.append({"image": file, "output": output, "detections": {k: v[keep] for k, v in det.items()}})
    return results


def _refuse_unreadable(files: Sequence[Path]) -> None:
    """Open every image's header before any is drawn: a bad file found halfway left half the outputs."""
    problems = []
    for file in files:
        try:
            with Image.open(file) as image:
                why = unreadable_mode(image)
        except (UnidentifiedImageError, OSError) as err:
            why = f"cannot be read as an image ({err})"
        if why is not None:
            problems.append(f"{file} {why}")
    if problems:
        raise ValueError(
            f"{len(problems)} of the {len(files)} images cannot be used:\n  " + "\n  ".join(problems)
        )


def save_prediction_grid(
    detector: Detector,
    coco_gt: Any,
    image_dir: str | os.PathLike,
    path: str | os.PathLike,
    *,
    count: int = 8,
    score_threshold: float | None = None,
) -> Path:
    """A PNG of the first ``count`` images of a COCO-format set: ground truth (left) beside predictions.

    With ``score_threshold=None`` each image shows its ``n`` highest-scoring detections, ``n`` the number of
    objects in it, whatever their scores (a young model's focal scores are low); else those above it.

    Arguments:
        detector: what :func:`load_detector` returns, or a :class:`Detector` around a model in memory.
        coco_gt: the set's COCO object (``dataset.coco``): image files, boxes and category ids.
        image_dir: the folder of the image files.
        path: the PNG to write.
    """
    category_ids = sorted(coco_gt.cats)
    panels = []
    for image_id in sorted(coco_gt.imgs)[:count]:
        info = coco_gt.imgs[image_id]
        image = read_rgb(Path(image_dir) / info["file_name"])
        anns = [a for a in coco_gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        truth = {
            "boxes": torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1),
            "labels": torch.tensor([category_ids.index(a["category_id"]) for a in anns], dtype=torch.long),
        }
        (det,) = detect(detector, [image])
        if score_threshold is None:  # as many of the best detections as there are objects
            top = det["scores"].argsort(descending=True)[: max(len(anns), 1)]
            det = {k: v[top] for k, v in det.items()}
        names = detector.class_names
        panels.append(draw_detections(image, truth, class_names=names, color="lime"))
        panels.append(draw_detections(image, det, class_names=names, score_threshold=score_threshold or 0.0))
    return save_grid(panels, path, columns=4)
