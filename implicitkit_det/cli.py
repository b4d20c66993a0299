"""Train and evaluate a detector: ``python -m implicitkit_det.cli [options]``.

Without a dataset this trains on the bundled digits detection set (built on first use); with ``--data-root``
(or the four explicit paths) it trains on COCO-format data. Under ``torchrun`` every process runs this same
program on its share of the data. Rank 0 prints the configuration, per-epoch losses and the COCO table,
and writes ``config.json``, ``metrics.jsonl`` (one JSON object per epoch) and ``checkpoint.pth`` into
``--output-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .data import (
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
from .distributed import is_main_process
from .engine.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .engine.distributed import (
    DistInfo,
    build_sampler,
    cleanup_distributed,
    init_distributed,
    unwrap,
    wrap_ddp,
)
from .engine.evaluate import evaluate
from .engine.optim import SCHEDULES, Schedule, build_scheduler, param_groups, parse_drops, recipe_for
from .engine.predict import Detector, save_prediction_grid
from .engine.refinement import refinement_curve, save_refinement_curve
from .engine.train import headline, make_grad_scaler, train_one_epoch
from .evaluation import CocoEvaluator
from .models import CONFIGS, ModelConfig, build_model

__all__ = ["build_parser", "main"]

DEFAULT_CONFIG = "deqdet_tiny"
# Shorter side / longer-side cap of the network input: COCO's standard sizes, and the digits set's native
# scale (its canvases are 128-192 pixels).
COCO_SIZE, COCO_MAX_SIZE = 800, 1333
DIGITS_SIZE, DIGITS_MAX_SIZE = 160, 256


def _print(*args: Any) -> None:
    if is_main_process():
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------------------
# Arguments.
def build_parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m implicitkit_det.cli",
        description="Train and evaluate DEQDet, AdaMixer, Sparse R-CNN or DEQ Sparse R-CNN. Without data "
        "options: the bundled digits set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--config",
        default=None,
        help=f"model config name (default {DEFAULT_CONFIG}, or the --resume checkpoint's)",
    )
    g.add_argument("--deq-steps", type=int, default=None, help="test-time refinement steps (DEQ models)")
    g.add_argument(
        "--deq-tol",
        type=float,
        default=None,
        help="DEQDet early exit: stop each image once its state changes by at most this (RMS per query of "
        "the scaled state, see docs/deqdet.md); at most --deq-steps steps. Default: the fixed step count",
    )
    g.add_argument(
        "--deq-solver",
        choices=("fixed", "anderson"),
        default=None,
        help="DEQDet early exit: plain iteration or Anderson acceleration (default fixed)",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model config entry (repeatable), e.g. --model-arg num_queries=50",
    )

    g = p.add_argument_group("data (default: the bundled digits set)")
    g.add_argument(
        "--data-root", type=Path, default=None, help="COCO folder: train2017/, val2017/, annotations/"
    )
    g.add_argument(
        "--train-ann", type=Path, default=None, help="training annotation file (overrides --data-root's)"
    )
    g.add_argument("--val-ann", type=Path, default=None, help="validation annotation file")
    g.add_argument("--train-images", type=Path, default=None, help="training image folder")
    g.add_argument("--val-images", type=Path, default=None, help="validation image folder")
    g.add_argument("--digits-train", type=int, default=1000, help="images in the bundled set's train split")
    g.add_argument("--digits-val", type=int, default=200, help="images in the bundled set's val split")
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"shorter side of the input (COCO {COCO_SIZE}, digits {DIGITS_SIZE})",
    )
    g.add_argument(
        "--max-size",
        type=int,
        default=None,
        help=f"cap on the longer side (COCO {COCO_MAX_SIZE}, digits {DIGITS_MAX_SIZE})",
    )
    g.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")
    g.add_argument(
        "--keep-empty-images",
        action="store_true",
        help="keep training images without boxes (default: left out, as the official pipeline does)",
    )
    g.add_argument(
        "--no-aspect-grouping",
        action="store_true",
        help="batch training images in plain sampler order (default: wide and tall images batched apart)",
    )

    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--schedule", choices=sorted(SCHEDULES), default=None, help="default: from the config name, else 1x"
    )
    g.add_argument(
        "--epochs", type=int, default=None, help="default: the schedule's (12 for 1x, 24 for 2x, 36 for 3x)"
    )
    g.add_argument(
        "--lr-drops",
        default=None,
        help="epochs where the lr drops 10x, e.g. 8,11 (default: the schedule's, scaled to --epochs)",
    )
    g.add_argument("--warmup-iters", type=int, default=500)
    g.add_argument("--batch-size", type=int, default=2, help="images per process (total = this x processes)")
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="evaluation images per process (default: 1 for COCO-format data, as the official test runs; "
        "--batch-size for the digits set)",
    )
    recipe = "default: the config's recipe (engine.optim.RECIPES; DEQDet: {}, Sparse R-CNN: {})"
    g.add_argument(
        "--lr", type=float, default=None, help="base AdamW learning rate; " + recipe.format(2.5e-5, 2.5e-5)
    )
    g.add_argument("--weight-decay", type=float, default=None, help=recipe.format(0.01, 1e-4))
    g.add_argument("--decoder-lr-mult", type=float, default=None, help=recipe.format(4, 1))
    g.add_argument("--decoder-wd-mult", type=float, default=None, help=recipe.format(10, 1))
    g.add_argument(
        "--no-decay-norm-bias", action="store_true", help="no weight decay on biases and norm layers"
    )
    g.add_argument(
        "--clip-max-norm", type=float, default=None, help="gradient clipping (0: off); " + recipe.format(1, 1)
    )
    g.add_argument(
        "--amp", action="store_true", help="mixed precision: bf16 on the CPU, fp16 + grad scaling on CUDA"
    )
    g.add_argument(
        "--one-graph-backward",
        action="store_true",
        help="build one graph of all supervised branches and back-propagate it once, instead of branch by "
        "branch (the same gradients, more memory)",
    )

    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output-dir", type=Path, default=None, help="default: outputs/<config>")
    g.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (or to evaluate)")
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    g.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="at most N training iterations per epoch and N evaluation batches",
    )
    g.add_argument("--print-freq", type=int, default=20, help="a progress line every N iterations")
    g.add_argument(
        "--refinement-curve",
        type=int,
        default=None,
        metavar="N",
        help="after the last evaluation, score a DEQ model after 0..N test-time refinement steps "
        "(refinement_curve.json and .png in the output folder)",
    )
    g.add_argument(
        "--save-predictions",
        type=int,
        default=0,
        metavar="K",
        help="after the last evaluation, draw K val images, ground truth beside predictions (predictions.png)",
    )
    g.add_argument(
        "--find-unused-parameters", action="store_true", help="DDP option for models with unused parameters"
    )
    return p


def _parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)  # numbers, booleans, lists; anything else stays a string
        except json.JSONDecodeError:
            out[key] = value
    return out


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = (
        "epochs",
        "batch_size",
        "eval_batch_size",
        "max_iters",
        "eval_every",
        "image_size",
        "max_size",
    )
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.deq_tol is not None and not args.deq_tol >= 0:
        parser.error(f"--deq-tol must be >= 0, got {args.deq_tol}")
    if args.workers < 0 or args.warmup_iters < 0 or (args.deq_steps is not None and args.deq_steps < 0):
        parser.error("--workers, --warmup-iters and --deq-steps must be >= 0")
    if args.lr is not None and args.lr <= 0:
        parser.error("--lr must be > 0")
    if args.eval_only and args.resume is None:
        parser.error("--eval-only evaluates a trained model: pass its checkpoint with --resume PATH")
    try:
        args.model_overrides = _parse_model_args(args.model_arg)
    except ValueError as err:
        parser.error(str(err))
    try:
        args.drops = parse_drops(args.lr_drops) if args.lr_drops is not None else None
    except ValueError:
        parser.error(f"--lr-drops {args.lr_drops!r}: give epochs separated by commas, e.g. 8,11")


# --------------------------------------------------------------------------------------------------------
# Data.
@dataclasses.dataclass
class DataPaths:
    """Image folders and annotation files of both splits; ``digits`` tells the bundled set's sizes apart."""

    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path
    digits: bool


def resolve_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DataPaths:
    """Find the data: explicit paths, else the layout under ``--data-root``, else the bundled digits set.

    Under ``--data-root`` either COCO's names (``train2017``, ``val2017``,
    ``annotations/instances_{train,val}2017.json``) or plain ones (``train``, ``val``,
    ``annotations/instances_{train,val}.json``, the bundled set's layout) are recognised.
    """
    explicit = {k: getattr(args, k) for k in ("train_images", "train_ann", "val_images", "val_ann")}
    if args.data_root is None and not any(explicit.values()):
        files = build_digits_detection(
            DigitsDetectionConfig(num_train=args.digits_train, num_val=args.digits_val)
        )
        return DataPaths(
            files.images("train"),
            files.annotations("train"),
            files.images("val"),
            files.annotations("val"),
            True,
        )

    found: dict[str, Path | None] = dict.fromkeys(explicit)
    if args.data_root is not None:
        root = args.data_root
        if not root.is_dir():
            parser.error(
                f"--data-root {root} is not a folder; pass the folder holding annotations/ and the images"
            )
        for suffix in ("2017", ""):
            ann = root / "annotations" / f"instances_train{suffix}.json"
            val_ann = root / "annotations" / f"instances_val{suffix}.json"
            if ann.is_file() or val_ann.is_file():
                found = {
                    "train_images": root / f"train{suffix}",
                    "train_ann": ann,
                    "val_images": root / f"val{suffix}",
                    "val_ann": val_ann,
                }
                break
    paths = {k: explicit[k] or found[k] for k in explicit}
    needed = ("val_images", "val_ann") if args.eval_only else tuple(paths)
    for key in needed:
        path = paths[key]
        flag = "--" + key.replace("_", "-")
        if path is None:
            parser.error(
                f"no {flag}: pass it, or a --data-root with annotations/instances_{{train,val}}2017.json, "
                "train2017/ and val2017/"
            )
        is_ok = path.is_file() if key.endswith("ann") else path.is_dir()
        if not is_ok:
            what = "annotation file" if key.endswith("ann") else "image folder"
            parser.error(f"{flag}: the {what} {path} does not exist; fix the path (or --data-root)")
    return DataPaths(**paths, digits=False)  # type: ignore[arg-type]


def input_size(args: argparse.Namespace, paths: DataPaths) -> tuple[int, int]:
    """The network input's shorter side and longer-side cap: the options, else the data's defaults."""
    size = args.image_size or (DIGITS_SIZE if paths.digits else COCO_SIZE)
    return size, args.max_size or (DIGITS_MAX_SIZE if paths.digits else COCO_MAX_SIZE)


def build_datasets(
    paths: DataPaths, args: argparse.Namespace, schedule_name: str
) -> tuple[CocoDetectionDataset | None, CocoDetectionDataset]:
    """The training (None for ``--eval-only``) and validation datasets with their transforms."""
    size, max_size = input_size(args, paths)
    if paths.digits:
        # Mild scale jitter; no flips, since a mirrored digit is not a digit.
        train_tf = make_train_transforms(
            scales=range(size - 32, size + 33, 16), max_size=max_size, hflip_prob=0.0
        )
    elif schedule_name in ("2x", "3x"):  # the multi-scale + crop recipe, scaled with the input size
        scales = [round(s * size / COCO_SIZE) for s in MULTI_SCALES]
        train_tf = make_train_transforms(scales=scales, max_size=max_size, crop=True)
    else:
        train_tf = make_train_transforms(scales=(size,), max_size=max_size)
    val = CocoDetectionDataset(
        paths.val_images, paths.val_ann, transforms=make_eval_transforms(size=size, max_size=max_size)
    )
    train = None
    if not args.eval_only:
        train = CocoDetectionDataset(
            paths.train_images, paths.train_ann, transforms=train_tf, remove_empty=not args.keep_empty_images
        )
        if train.category_ids != val.category_ids:
            raise ValueError(
                f"{paths.train_ann} and {paths.val_ann} have different categories ({train.category_ids} vs "
                f"{val.category_ids}); both splits must use the same category list"
            )
    return train, val


def make_loader(
    dataset: CocoDetectionDataset,
    args: argparse.Namespace,
    *,
    train: bool,
    device: torch.device,
    batch_size: int | None = None,
) -> DataLoader:
    """A loader over this process's share, batches padded by :func:`collate_detection`.

    Training batches hold ``--batch-size`` images grouped by aspect ratio (:class:`GroupedBatchSampler`,
    unless ``--no-aspect-grouping``); evaluation batches hold `batch_size` images in order.
    """
    sampler = build_sampler(dataset, shuffle=train, seed=args.seed)
    if train and not args.no_aspect_grouping:
        groups = aspect_ratio_groups(dataset.aspect_ratios)
        batching: dict[str, Any] = {"batch_sampler": GroupedBatchSampler(sampler, groups, args.batch_size)}
    else:
        batching = {"sampler": sampler, "batch_size": batch_size or args.batch_size}
    return DataLoader(
        dataset,
        **batching,
        collate_fn=partial(collate_detection, size_divisor=32),
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a training loader for `epoch`, through its batch sampler or its sampler."""
    target = loader.batch_sampler if isinstance(loader.batch_sampler, GroupedBatchSampler) else loader.sampler
    target.set_epoch(epoch)  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------
# Model.
def _config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)]


def _set_test_steps(model: nn.Module, steps: int) -> None:
    target = unwrap(model)
    if not hasattr(target, "test_steps"):
        raise ValueError(
            f"--deq-steps: {type(target).__name__} has no test-time step count (not a DEQ model)"
        )
    target.test_steps = steps


def _set_early_exit(model: nn.Module, tol: float | None, solver: str | None) -> None:
    target = unwrap(model)
    if not hasattr(target, "test_tol"):
        raise ValueError(f"--deq-tol / --deq-solver: {type(target).__name__} has no early exit (DEQDet has)")
    if tol is not None:
        target.test_tol = tol
    if solver is not None:
        target.test_solver = solver


def _apply_recipe(args: argparse.Namespace, arch: str) -> None:
    """Fill the optimiser options left unset from the architecture's :class:`OptimizerRecipe`."""
    recipe = recipe_for(arch)
    for field in dataclasses.fields(recipe):
        if getattr(args, field.name) is None:
            setattr(args, field.name, getattr(recipe, field.name))


def _schedule(args: argparse.Namespace, config: str) -> tuple[str, Schedule]:
    name = args.schedule or next((s for s in SCHEDULES if config.endswith(s)), "1x")
    schedule = SCHEDULES[name]
    if args.epochs is not None and args.epochs != schedule.epochs:
        schedule = schedule.with_epochs(args.epochs)
    if args.drops is not None:
        schedule = dataclasses.replace(schedule, drops=args.drops)
    return name, dataclasses.replace(schedule, warmup_iters=args.warmup_iters)


# --------------------------------------------------------------------------------------------------------
# The run.
def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "model_arg"}


def _write_jsonl(path: Path, record: dict[str, Any]) -> None:
    if is_main_process():
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _summary_lines(items: dict[str, Any]) -> str:
    width = max(len(k) for k in items)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in items.items())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run training and/or evaluation as the options say.

    **Returns** the last evaluation's stats (the 12 COCO stats and ``per_class_AP``), or ``{}`` when the
    run evaluated nothing.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    info = init_distributed(args.device)
    try:
        return _run(args, parser, info)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, info: DistInfo) -> dict[str, Any]:
    checkpoint = read_checkpoint(args.resume) if args.resume is not None else None
    saved = (checkpoint or {}).get("config") or {}
    config = args.config or saved.get("name") or DEFAULT_CONFIG
    if checkpoint is not None and saved.get("name") not in (None, config):
        parser.error(
            f"--config {config} but {args.resume} was trained with {saved['name']}; drop --config or fix it"
        )
    known = sorted(CONFIGS)
    if config not in known:
        parser.error(f"unknown --config {config!r}; choose one of {known}")
    overrides = {**saved.get("overrides", {}), **args.model_overrides}
    fields = _config_fields()
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        parser.error(f"--model-arg {unknown}: not model config fields; the fields are {fields}")
    try:
        _apply_recipe(args, overrides.get("arch", CONFIGS[config].arch))
    except KeyError as err:
        parser.error(f"--model-arg arch: {err.args[0]}")
    try:
        schedule_name, schedule = _schedule(args, config)
    except ValueError as err:
        parser.error(f"--epochs / --lr-drops: {err}")

    random.seed(args.seed + info.rank)
    torch.manual_seed(args.seed + info.rank)  # the data order comes from the samplers' (seed, epoch)

    paths = resolve_data(args, parser)
    train_set, val_set = build_datasets(paths, args, schedule_name)
    num_classes = val_set.num_classes
    model = build_model(config, num_classes, **overrides).to(info.device)
    try:
        if args.deq_steps is not None:
            _set_test_steps(model, args.deq_steps)
        if args.deq_tol is not None or args.deq_solver is not None:
            _set_early_exit(model, args.deq_tol, args.deq_solver)
    except ValueError as err:
        parser.error(str(err))
    model_config = {
        "name": config,
        "num_classes": num_classes,
        "overrides": overrides,
        "class_names": list(val_set.category_names),
        "input_size": list(input_size(args, paths)),  # what predict() resizes raw images to
    }

    output_dir = args.output_dir or Path("outputs") / config
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = output_dir / "metrics.jsonl"
    if info.is_main and checkpoint is None and not args.eval_only:
        # A fresh run replaces the folder's previous run (its checkpoint is overwritten too); a resumed run
        # or an evaluation appends.
        metrics_file.unlink(missing_ok=True)
    eval_batch_size = args.eval_batch_size or (args.batch_size if paths.digits else 1)
    val_loader = make_loader(val_set, args, train=False, device=info.device, batch_size=eval_batch_size)
    evaluator = CocoEvaluator(val_set.coco)

    def run_eval(epoch: int) -> dict[str, Any]:
        _print(f"evaluating on {len(val_set)} images ({paths.val_ann})")
        stats = evaluate(
            model,
            val_loader,
            evaluator,
            device=info.device,
            label_to_category_id=val_set.label_to_category_id,
            amp=args.amp,
            max_iters=args.max_iters,
            log=_print,
        )
        steps = f"  steps/image {stats['mean_steps']:.2f}" if "mean_steps" in stats else ""
        _print(
            f"epoch {epoch}: AP {stats['AP']:.4f}  AP50 {stats['AP50']:.4f}  AP75 {stats['AP75']:.4f}{steps}"
        )
        return stats

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {
        "config": f"{config} {overrides or ''}".strip(),
        "parameters": f"{n_params / 1e6:.2f} M ({n_trainable / 1e6:.2f} M trainable)",
        "data": f"{'bundled digits set' if paths.digits else 'COCO-format'}: {paths.val_ann.parent.parent}",
        "classes": num_classes,
        "val images": f"{len(val_set)} (batch {eval_batch_size})",
        "device": f"{info.device} x {info.world_size} process(es)",
        "amp": args.amp,
        "output": output_dir,
    }

    if args.eval_only:
        load_checkpoint(checkpoint, model=model)
        _print("evaluation only\n" + _summary_lines({**summary, "checkpoint": args.resume}))
        stats = run_eval(checkpoint["epoch"])
        _write_jsonl(metrics_file, {"epoch": checkpoint["epoch"], "eval": stats})
        _pictures(model, args, paths, val_set, val_loader, output_dir, info)
        return stats

    assert train_set is not None
    train_loader = make_loader(train_set, args, train=True, device=info.device)
    iters_per_epoch = min(len(train_loader), args.max_iters or len(train_loader))
    groups = param_groups(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        decoder_lr_mult=args.decoder_lr_mult,
        decoder_wd_mult=args.decoder_wd_mult,
        no_decay_norm_bias=args.no_decay_norm_bias,
    )
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = build_scheduler(optimizer, schedule, iters_per_epoch)
    scaler = make_grad_scaler(info.device, args.amp)
    model = wrap_ddp(model, info, find_unused_parameters=args.find_unused_parameters)

    start_epoch = 0
    if checkpoint is not None:
        # Exact continuation for a single process; several processes re-seed per rank instead.
        load_checkpoint(
            checkpoint,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            restore_rng=info.world_size == 1,
        )
        start_epoch = checkpoint["epoch"] + 1
        if info.world_size > 1:
            torch.manual_seed(args.seed + info.rank + 1000 * start_epoch)

    summary.update(
        {
            "train images": f"{len(train_set)} ({iters_per_epoch} iterations/epoch, "
            f"batch {args.batch_size} x {info.world_size}"
            f"{'' if args.no_aspect_grouping else ', grouped by aspect ratio'}; "
            f"{train_set.removed_empty} without boxes left out)",
            "schedule": f"{schedule_name}: {schedule.epochs} epochs, lr x{schedule.gamma} at epochs "
            f"{list(schedule.drops)}, {schedule.warmup_iters} warm-up iterations",
            "optimizer": "AdamW: "
            + ", ".join(f"{g['name']} lr {g['initial_lr']:.3g} wd {g['weight_decay']:.3g}" for g in groups),
            "clip": args.clip_max_norm or "off",
            "backward": "one graph" if args.one_graph_backward else "branch-wise",
        }
    )
    if start_epoch:
        summary["resumed"] = f"{args.resume} (epoch {start_epoch - 1} done)"
    _print("training\n" + _summary_lines(summary))
    if info.is_main:
        (output_dir / "config.json").write_text(
            json.dumps({"model": model_config, "args": _jsonable(args)}, indent=2)
        )

    stats: dict[str, Any] = {}
    start = time.perf_counter()
    for epoch in range(start_epoch, schedule.epochs):
        set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(
            model,
            train_loader,
            optimizer,
            device=info.device,
            epoch=epoch,
            scheduler=scheduler,
            amp=args.amp,
            scaler=scaler,
            clip_max_norm=args.clip_max_norm,
            max_iters=args.max_iters,
            print_freq=args.print_freq,
            log=_print,
            branchwise=not args.one_graph_backward,
        )
        _print(
            f"epoch {epoch} done in {train_stats['time_s']:.1f}s: "
            + "  ".join(f"{k} {v:.4f}" for k, v in headline(train_stats).items())
        )
        save_checkpoint(
            output_dir / "checkpoint.pth",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            epoch=epoch,
            config=model_config,
            args=_jsonable(args),
            scaler=scaler,
        )
        record: dict[str, Any] = {"epoch": epoch, "train": train_stats}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == schedule.epochs:
            stats = run_eval(epoch)
            record["eval"] = stats
        _write_jsonl(metrics_file, record)
    _print(f"training done in {time.perf_counter() - start:.1f}s; outputs in {output_dir}")
    _pictures(model, args, paths, val_set, val_loader, output_dir, info)
    return stats


def _pictures(
    model: nn.Module,
    args: argparse.Namespace,
    paths: DataPaths,
    val_set: CocoDetectionDataset,
    val_loader: Any,
    output_dir: Path,
    info: DistInfo,
) -> None:
    """What a person looks at after a run: the refinement curve and val predictions beside ground truth."""
    model = unwrap(model)
    if args.refinement_curve is not None:
        _print(f"refinement curve: AP after 0..{args.refinement_curve} test-time steps")
        curve = refinement_curve(
            model,
            val_loader,
            val_set.coco,
            max_steps=args.refinement_curve,
            device=info.device,
            label_to_category_id=val_set.label_to_category_id,
        )
        _print("  ".join(f"{p['steps']}: {p['AP']:.3f}" for p in curve))
        if info.is_main:
            json_path, png = save_refinement_curve(
                curve, output_dir, train_depth=getattr(model, "train_steps", None)
            )
            _print(f"refinement curve saved to {png} and {json_path}")
    if args.save_predictions and info.is_main:
        size, max_size = input_size(args, paths)
        detector = Detector(model.eval(), size, max_size, list(val_set.category_names), info.device)
        grid = save_prediction_grid(
            detector,
            val_set.coco,
            paths.val_images,
            output_dir / "predictions.png",
            count=args.save_predictions,
        )
        _print(f"predictions (ground truth left, model right) saved to {grid}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
