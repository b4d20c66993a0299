"""Train, evaluate and draw detections: ``python -m implicitkit_det.cli [train|eval|predict] [options]``.

Without a dataset this trains on the bundled digits detection set (built on first use); with ``--data-root``
(or the four explicit paths) it trains on COCO-format data. Under ``torchrun`` every process runs this same
program on its share of the data. The subcommand is optional: the flat options of earlier versions (no
subcommand, ``--eval-only``) keep working; ``eval`` is ``--eval-only`` and ``predict`` is
:mod:`implicitkit_det.predict`.

This module only reads the command line: :func:`~implicitkit_det.engine.run_config.build_run_config` turns
the options (and, on ``--resume``, the checkpoint) into a checked run configuration, and
:func:`~implicitkit_det.engine.run.fit` / :func:`~implicitkit_det.engine.run.evaluate_checkpoint` run it.
See docs/training.md for the run folder, checkpoints, resuming and Ctrl-C.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .collectives import get_world_size, is_main_process
from .data import CocoFormatError
from .data.checks import DataError
from .engine.checkpoint import read_checkpoint
from .engine.interrupt import TrainingInterrupted
from .engine.optim import SCHEDULES
from .engine.process_group import cleanup_distributed
from .engine.run import evaluate_checkpoint, fit
from .engine.run_config import (
    COCO_MAX_SIZE,
    COCO_SIZE,
    DEFAULT_CONFIG,
    DIGITS_MAX_SIZE,
    DIGITS_SIZE,
    RunConfig,
    RunConfigError,
    build_run_config,
    uses_digits,
)

__all__ = ["COMMANDS", "build_parser", "given_options", "main", "names_data"]

COMMANDS = ("train", "eval", "predict")
# One source of defaults: RunConfig's; an option without a default here is resolved by build_run_config.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(
        prog="python -m implicitkit_det.cli",
        usage="%(prog)s [train|eval|predict] [options]",
        description="Train and evaluate DEQDet, AdaMixer, Sparse R-CNN or DEQ Sparse R-CNN. Without data "
        "options: the bundled digits set. 'eval' is --eval-only; 'predict' draws a checkpoint's detections "
        "(python -m implicitkit_det.cli predict --help). On --resume the run's own settings are restored; "
        "an option given again is applied where a running run can change it (epochs, lr, warm-up, drops, "
        "evaluation and checkpoint frequency, loading, test-time steps) and refused otherwise.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _model_options(p)
    _data_options(p)
    _optimisation_options(p)
    _run_options(p)
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--config",
        default=None,
        help=f"model config name (default {DEFAULT_CONFIG}, or the --resume checkpoint's)",
    )
    g.add_argument(
        "--deq-steps",
        type=int,
        default=None,
        help="test-time refinement steps (DEQ models); --model-arg test_steps=N (test_tol, test_solver) is the "
        "same option",
    )
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
        help="override a model config entry (repeatable), read by the field's type: --model-arg "
        "num_queries=50, neck_relu=false, supervise_steps=1,3,6, test_tol=none",
    )


def _data_options(p: argparse.ArgumentParser) -> None:
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
    g.add_argument(
        "--digits-train",
        type=int,
        default=DEFAULTS["digits_train"],
        help="images in the bundled set's train split",
    )
    g.add_argument(
        "--digits-val", type=int, default=DEFAULTS["digits_val"], help="images in the bundled set's val split"
    )
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
    g.add_argument(
        "--workers", type=int, default=DEFAULTS["workers"], help="data-loading processes per training process"
    )
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


def _optimisation_options(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--warmup-iters", type=int, default=DEFAULTS["warmup_iters"])
    g.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS["batch_size"],
        help="images per process (total = this x processes)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help="evaluation images per process (default: 1 for COCO-format data, as the official test runs; "
        "--batch-size for the digits set)",
    )
    recipe = "default: the config's recipe (its row of models.ARCHITECTURES; DEQDet: {}, Sparse R-CNN: {})"
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
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="mixed precision for the backbone and the neck: bf16 on the CPU, fp16 + grad scaling on CUDA "
        "(the decoder stays in float32); --no-amp turns off a recipe's",
    )
    g.add_argument("--amp-decoder", action="store_true", help="with --amp, the decoder in low precision too")
    g.add_argument(
        "--one-graph-backward",
        action="store_true",
        help="build one graph of all supervised branches and back-propagate it once, instead of branch by "
        "branch (the same gradients, more memory)",
    )


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    g.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="run folder (default: outputs/<config>). A folder holding an earlier run is left untouched: the "
        "new run goes to <folder>-run2 (-run3, ...) unless --overwrite",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the earlier run's files in --output-dir and start anew",
    )
    g.add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a run folder (its checkpoint_last.pth) or a checkpoint file: continue that run, with its settings "
        "and folder (or evaluate it with --eval-only)",
    )
    g.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    _run_schedule_and_outputs(g)


def _run_schedule_and_outputs(g: argparse._ArgumentGroup) -> None:
    """The run group's second half: evaluation and checkpoint frequency, logging, what is drawn."""
    g.add_argument(
        "--eval-every",
        type=int,
        default=DEFAULTS["eval_every"],
        help="evaluate every N epochs (and after the last)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=DEFAULTS["checkpoint_every"],
        metavar="N",
        help="also save checkpoint_last.pth every N iterations (0: at the end of each epoch only); a resumed "
        "run continues from that iteration with the same data",
    )
    g.add_argument(
        "--keep-every",
        type=int,
        default=DEFAULTS["keep_every"],
        metavar="K",
        help="keep a copy of the checkpoint of every K-th epoch (checkpoint_epoch<N>.pth); 0: none",
    )
    g.add_argument(
        "--skip-image-check",
        action="store_true",
        help="do not open every image before training (for trusted data: a bad image then stops the run "
        "when it is loaded)",
    )
    g.add_argument(
        "--log-steps", action="store_true", help="write one JSON line per iteration to steps.jsonl"
    )
    g.add_argument(
        "--max-iters",
        type=int,
        default=None,
        help="at most N training iterations per epoch and N evaluation batches",
    )
    g.add_argument(
        "--print-freq", type=int, default=DEFAULTS["print_freq"], help="a progress line every N iterations"
    )
    g.add_argument(
        "--refinement-curve",
        type=int,
        default=None,
        metavar="N",
        help="after the last evaluation, score the model after 0..N test-time refinement steps (a stack of "
        "stages: each stage, then its last one again) "
        "(refinement_curve.json and .png in the output folder)",
    )
    g.add_argument(
        "--save-predictions",
        type=int,
        default=DEFAULTS["save_predictions"],
        metavar="K",
        help="after the last evaluation, draw K val images, ground truth beside predictions (predictions.png)",
    )
    g.add_argument(
        "--find-unused-parameters", action="store_true", help="DDP option for models with unused parameters"
    )


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The options of `parser` that `argv` names (by destination), told apart from those left at their
    defaults: a copy of `parser` whose defaults are all ``argparse.SUPPRESS`` leaves only the given ones."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return set(vars(probe.parse_known_args(argv)[0]))


def names_data(argv: Sequence[str]) -> bool:
    """Whether a command line names a dataset (else a run uses the bundled digits set)."""
    argv = [a for a in argv[1 if argv[:1] and argv[0] in COMMANDS else 0 :] if a not in ("-h", "--help")]
    return not uses_digits(dict.fromkeys(given_options(build_parser(), argv), True))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run training, evaluation or prediction as the command line says.

    Returns:
        The last evaluation's stats (the 12 COCO stats, ``per_class_AP``, ``images``, the test-time
        settings), or ``{}`` when the run evaluated nothing; for ``predict``, its list of results.

    Raises:
        ``SystemExit(130)`` after a Ctrl-C during training, once the checkpoint is saved and the
        command to resume printed; ``SystemExit(2)`` with a message for unusable options or data.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "predict":
        from .predict import main as predict_main

        return predict_main(argv)  # type: ignore[return-value]
    if command == "eval" and "--eval-only" not in argv:
        argv.insert(0, "--eval-only")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.resume) if args.resume is not None else None
        cfg = build_run_config(vars(args), given_options(parser, argv), checkpoint)
    except (RunConfigError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    try:
        if cfg.eval_only:
            return evaluate_checkpoint(cfg)
        return fit(cfg, checkpoint=checkpoint)
    except TrainingInterrupted as stop:
        if is_main_process():
            folder = stop.checkpoint.parent if stop.checkpoint is not None else cfg.output_dir
            world = get_world_size()
            launcher = f"torchrun --nproc-per-node={world}" if world > 1 else "python"
            print(f"\n{stop}", flush=True)
            print(f"resume with: {launcher} -m implicitkit_det.cli --resume {folder}", flush=True)
        raise SystemExit(130) from None
    except (DataError, CocoFormatError, RunConfigError) as err:
        parser.error(str(err))
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
