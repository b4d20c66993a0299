"""What a run builds from its :class:`~.run_config.RunConfig` before the loop: folder, data, loaders, model."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader

from ..collectives import broadcast_object, is_main_process
from ..data import (
    MULTI_SCALES,
    CocoDetectionDataset,
    DigitsDetectionConfig,
    GroupedBatchSampler,
    aspect_ratio_groups,
    build_digits_detection,
    collate_detection,
    make_eval_transforms,
    make_train_transforms,
)
from ..data.checks import DataError, check_images, check_splits
from ..data.seeding import EpochBatches, SeededSamples, leave_the_process_group
from ..models import CONFIGS, build_model
from ..models.registry import read_overrides, without_weight_files
from .checkpoint import BEST, LAST, LEGACY, remove_stale_temporaries
from .process_group import DealtBatches, build_sampler
from .run_config import COCO_SIZE, RunConfig, RunConfigError, test_settings_of

__all__ = [
    "RUN_FILES",
    "DataPaths",
    "RunData",
    "build_run_model",
    "load_data",
    "make_eval_loader",
    "make_train_loader",
    "prepare_output_dir",
    "resolve_data",
    "say",
    "seed_everything",
]

#: The files that make a folder a run folder (and that ``--overwrite`` removes).
RUN_FILES = (
    "config.json", "metrics.jsonl", "steps.jsonl", LAST, BEST, LEGACY, "checkpoint_epoch*.pth",
    "training_curves.png", "predictions.png", "refinement_curve.json", "refinement_curve.png",
)  # fmt: skip


def say(*args: Any) -> None:
    """Print on rank 0."""
    if is_main_process():
        print(*args, flush=True)


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and NumPy's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# The run folder.
def _run_files(folder: Path) -> list[Path]:
    return sorted(p for pattern in RUN_FILES for p in folder.glob(pattern))


def prepare_output_dir(cfg: RunConfig) -> RunConfig:
    """Choose and create the run folder; the same answer on every process.

    A fresh run never touches an earlier run's files: when `cfg.output_dir` holds a run (a
    ``config.json``, ``metrics.jsonl`` or checkpoint), this run writes to the first free ``<folder>-run2``,
    ``-run3``, ... and says so, unless ``overwrite`` asks to delete that run's files first. A resumed run
    continues in its folder. Temporary files a killed checkpoint write left are removed.
    """
    decided = None
    if is_main_process():
        folder = Path(cfg.output_dir)
        if cfg.resumed_from is None and not cfg.eval_only and _run_files(folder):
            folder = _fresh_folder(folder, cfg.overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(folder):
            say(f"removed {stale}, left by a checkpoint write that was cut short")
        decided = str(folder)
    return dataclasses.replace(cfg, output_dir=Path(broadcast_object(decided)))


def _fresh_folder(folder: Path, overwrite: bool) -> Path:
    if overwrite:
        for path in _run_files(folder):
            path.unlink()
        say(f"--overwrite: removed the earlier run's files from {folder}")
        return folder
    k = 2
    while _run_files(candidate := folder.with_name(f"{folder.name}-run{k}")):
        k += 1
    say(
        f"{folder} holds an earlier run, left as it is; this run writes to {candidate} "
        f"(--resume {folder} continues that run, --overwrite replaces it)"
    )
    return candidate


# --------------------------------------------------------------------------------------------------------
# Data.
@dataclass(frozen=True)
class DataPaths:
    """Image folders and annotation files of both splits; ``digits`` tells the bundled set's sizes apart."""

    train_images: Path | None
    train_ann: Path | None
    val_images: Path
    val_ann: Path
    digits: bool


def resolve_data(cfg: RunConfig) -> DataPaths:
    """Find the data: explicit paths, else the layout under ``data_root``, else the bundled digits set.

    Under ``data_root`` either COCO's names (``train2017``, ``val2017``,
    ``annotations/instances_{train,val}2017.json``) or plain ones (``train``, ``val``,
    ``annotations/instances_{train,val}.json``, the bundled set's layout) are recognised.

    Raises:
        :class:`~implicitkit_det.data.checks.DataError` naming the option to fix.
    """
    if cfg.on_digits:
        files = build_digits_detection(
            DigitsDetectionConfig(num_train=cfg.digits_train, num_val=cfg.digits_val)
        )
        split = {s: (files.images(s), files.annotations(s)) for s in ("train", "val")}
        return DataPaths(*split["train"], *split["val"], digits=True)
    explicit = {k: getattr(cfg, k) for k in ("train_images", "train_ann", "val_images", "val_ann")}
    found: dict[str, Path | None] = dict.fromkeys(explicit)
    if cfg.data_root is not None:
        root = Path(cfg.data_root)
        if not root.is_dir():
            raise DataError(
                f"--data-root {root} is not a folder; pass the folder holding annotations/ and the images"
            )
        for suffix in ("2017", ""):
            ann, val_ann = (root / "annotations" / f"instances_{s}{suffix}.json" for s in ("train", "val"))
            if ann.is_file() or val_ann.is_file():
                found = dict(
                    zip(explicit, (root / f"train{suffix}", ann, root / f"val{suffix}", val_ann), strict=True)
                )
                break
    paths = {k: explicit[k] or found[k] for k in explicit}
    for key in ("val_images", "val_ann") if cfg.eval_only else tuple(paths):
        flag, path = "--" + key.replace("_", "-"), paths[key]
        if path is None:
            raise DataError(
                f"no {flag}: pass it, or a --data-root with annotations/instances_{{train,val}}2017.json, "
                "train2017/ and val2017/"
            )
        if not (Path(path).is_file() if key.endswith("ann") else Path(path).is_dir()):
            what = "annotation file" if key.endswith("ann") else "image folder"
            raise DataError(f"{flag}: the {what} {path} does not exist; fix the path (or --data-root)")
    return DataPaths(**paths, digits=False)  # type: ignore[arg-type]


@dataclass
class RunData:
    """The datasets of a run (``train`` is None when only evaluating), and the evaluation loader once made
    (its workers are kept from one evaluation to the next)."""

    paths: DataPaths
    train: CocoDetectionDataset | None
    val: CocoDetectionDataset
    val_loader: DataLoader | None = None


def load_data(cfg: RunConfig, *, train: bool, class_names: Sequence[str] | None = None) -> RunData:
    """Resolve, read and check the data, before any training: see :mod:`implicitkit_det.data.checks`.

    `class_names`: the classes a checkpoint was trained on, which the validation annotations must list in
    the same order (checked before the images are read, so a wrong file is refused at once).
    """
    paths = resolve_data(cfg)
    size, max_size = cfg.image_size, cfg.max_size
    val = CocoDetectionDataset(
        paths.val_images, paths.val_ann, transforms=make_eval_transforms(size=size, max_size=max_size)
    )
    train_set = None
    if train:
        train_set = CocoDetectionDataset(
            paths.train_images,  # type: ignore[arg-type]
            paths.train_ann,  # type: ignore[arg-type]
            transforms=_train_transforms(cfg, paths.digits),
            remove_empty=not cfg.keep_empty_images,
        )
    check_splits(train_set, val)
    if train_set is not None and _categories(train_set) != _categories(val):
        raise DataError(
            f"{paths.train_ann} and {paths.val_ann} have different categories ({_categories(train_set)} vs "
            f"{_categories(val)}, as (id, name)); both splits must use the same category list, or labels "
            "would be scored, and named, as other classes"
        )
    if class_names is not None and list(class_names) != list(val.category_names):
        raise DataError(
            f"{cfg.resumed_from} was trained on the classes {list(class_names)}, but {paths.val_ann} lists "
            f"{list(val.category_names)} (in category-id order): its labels would be scored as other "
            "classes. Evaluate on annotations with the same categories"
        )
    if not cfg.skip_image_check:
        for split, data in (("training", train_set), ("validation", val)):
            if data is not None:
                check_images(data, split=split, threads=cfg.workers + 1)
    return RunData(paths, train_set, val)


def _categories(data: CocoDetectionDataset) -> list[tuple[int, str]]:
    return list(zip(data.category_ids, data.category_names, strict=True))


def _train_transforms(cfg: RunConfig, digits: bool) -> Any:
    size, max_size = cfg.image_size, cfg.max_size
    if digits:  # mild scale jitter; no flips, since a mirrored digit is not a digit
        return make_train_transforms(
            scales=range(size - 32, size + 33, 16), max_size=max_size, hflip_prob=0.0
        )
    if cfg.schedule in ("2x", "3x"):  # the multi-scale + crop recipe, scaled with the input size
        scales = [round(s * size / COCO_SIZE) for s in MULTI_SCALES]
        return make_train_transforms(scales=scales, max_size=max_size, crop=True)
    return make_train_transforms(scales=(size,), max_size=max_size)


def _loader(dataset: Any, batches: Any, cfg: RunConfig, device: torch.device) -> DataLoader:
    # The loader's own generator: creating an iterator draws its workers' base seed from it, not from the
    # global generator that the model's random perturbation uses.
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=partial(collate_detection, size_divisor=32),
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        worker_init_fn=leave_the_process_group if cfg.workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def make_train_loader(cfg: RunConfig, dataset: CocoDetectionDataset, device: torch.device) -> DataLoader:
    """Training batches of this process's share, grouped by aspect ratio (unless ``no_aspect_grouping``),
    in an :class:`~implicitkit_det.data.seeding.EpochBatches` (``loader.batch_sampler``): call its
    ``set_epoch(epoch, start)`` before each epoch."""
    sampler = build_sampler(dataset, shuffle=True, seed=cfg.seed)
    if cfg.no_aspect_grouping:
        inner: Any = BatchSampler(sampler, cfg.batch_size, drop_last=False)
    else:
        inner = GroupedBatchSampler(sampler, aspect_ratio_groups(dataset.aspect_ratios), cfg.batch_size)
    return _loader(SeededSamples(dataset), EpochBatches(inner, cfg.seed), cfg, device)


def make_eval_loader(
    cfg: RunConfig, dataset: CocoDetectionDataset, device: torch.device, digits: bool
) -> DataLoader:
    """Evaluation batches of this process's share, in order (``eval_batch_size``: default 1 for COCO-format
    data, as the official test runs, and ``batch_size`` for the digits set): the batches one process would
    form, dealt to the processes (:class:`DealtBatches`), so the AP does not depend on their number."""
    batch_size = cfg.eval_batch_size or (cfg.batch_size if digits else 1)
    return _loader(dataset, DealtBatches(len(dataset), batch_size), cfg, device)


# --------------------------------------------------------------------------------------------------------
# The model.
def build_run_model(cfg: RunConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The detector `cfg` names, with its test-time settings (``deq_steps``, ``deq_tol``, ``deq_solver``)."""
    # One set of options serves every detector (the digits demo's shared shapes, a run saved with them):
    # what this architecture does not read is dropped, and said, rather than refused.
    overrides, unread = read_overrides(cfg.config, cfg.overrides)
    if unread:
        arch = overrides.get("arch", CONFIGS[cfg.config].arch)
        say(f"--model-arg {', '.join(unread)}: not read by the {arch} detector, ignored")
    if cfg.resumed_from is not None:  # the checkpoint's weights replace the pre-trained ones: no file read
        overrides = without_weight_files(cfg.config, overrides)
    try:
        model = build_model(cfg.config, num_classes, **overrides).to(device)
    except ValueError as err:  # a model option out of its range, named by the constructor that refused it
        raise RunConfigError(f"--config {cfg.config} with its --model-arg options: {err}") from err
    model.configure_test(**test_settings_of(cfg))
    model.low_precision_decoder = cfg.amp_decoder
    return model
