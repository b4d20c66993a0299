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
import os
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .collectives import get_world_size, is_main_process
from .data import CocoFormatError
from .data.checks import DataError
from .engine.checkpoint import read_checkpoint
from .engine.interrupt import TrainingInterrupted
from .engine.process_group import cleanup_distributed
from .engine.run import evaluate_checkpoint, fit
from .engine.run_config import RunConfig, RunConfigError, build_run_config, uses_digits
from .engine.run_settings import option_flag

__all__ = ["COMMANDS", "build_parser", "given_options", "main", "names_data"]

COMMANDS = ("train", "eval", "predict")
_GROUPS = {
    "model": "model",
    "data": "data (default: the bundled digits set)",
    "optimisation": "optimisation",
    "run": "run",
}
_ARGPARSE_KEYS = ("choices", "metavar", "type")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help already says it or there is none to say
    (a default of ``None`` means "worked out from other settings", which the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if "default" in (action.help or "").lower() or default is None or default is False or default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options, one per :class:`RunConfig` field that carries option metadata (its default
    and help text there; ``--help`` lists them), and ``--resume``."""
    p = argparse.ArgumentParser(
        prog="python -m implicitkit_det.cli",
        usage="%(prog)s [train|eval|predict] [options]",
        description="Train and evaluate DEQDet, AdaMixer, Sparse R-CNN or DEQ Sparse R-CNN. Without data "
        "options: the bundled digits set. 'eval' is --eval-only; 'predict' draws a checkpoint's detections "
        "(python -m implicitkit_det.cli predict --help). On --resume the run's own settings are restored; "
        "an option given again is applied where a running run can change it (epochs, lr, warm-up, drops, "
        "evaluation and checkpoint frequency, loading, test-time steps) and refused otherwise.",
        formatter_class=_DefaultsFormatter,
    )
    groups = {name: p.add_argument_group(title) for name, title in _GROUPS.items()}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if "help" in f.metadata:
            groups[f.metadata["group"]].add_argument(option_flag(f.name), **_argument(f, hints[f.name]))
    groups["run"].add_argument(
        "--resume",
        type=Path,
        default=None,
        help="a run folder (its checkpoint_last.pth) or a checkpoint file: continue that run, with its settings "
        "and folder (or evaluate it with --eval-only)",
    )
    return p


def _argument(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument``'s keywords for the option of field `f` (annotation `hint`)."""
    meta = f.metadata
    kwargs: dict[str, Any] = {"help": meta["help"], **{k: meta[k] for k in _ARGPARSE_KEYS if k in meta}}
    value_type = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    action = meta.get("action")
    if action == "append":
        return {**kwargs, "action": "append", "default": []}
    if action == "boolean_optional":
        return {**kwargs, "action": argparse.BooleanOptionalAction, "default": f.default}
    if value_type is bool:
        return {**kwargs, "action": "store_true"}
    kwargs.setdefault("type", value_type)
    kwargs["default"] = None if meta["resolved"] else f.default
    return kwargs


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


def launcher_for(world_size: int, local_world_size: int) -> str:
    """The command that starts a run again with `world_size` processes, `local_world_size` per node."""
    if world_size == 1:
        return "python"
    if local_world_size >= world_size:
        return f"torchrun --nproc-per-node={world_size}"
    nodes = world_size // local_world_size
    return f"torchrun --nnodes={nodes} --nproc-per-node={local_world_size} [rendezvous options]"


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

        return predict_main(argv, prog="python -m implicitkit_det.cli predict")  # type: ignore[return-value]
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
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's processes on this node
            print(f"\n{stop}", flush=True)
            print(
                f"resume with: {launcher_for(world, local)} -m implicitkit_det.cli --resume {folder}",
                flush=True,
            )
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
