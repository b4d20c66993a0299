"""The settings of a run, resolved and checked once: from the options, and on resume from the checkpoint.

:func:`build_run_config` turns the command line's values (a dict keyed like the options, ``lr_drops`` for
``--lr-drops``) into a frozen :class:`RunConfig`: defaults filled in (the config's optimiser recipe, the
schedule, the data's input size), every value checked, the model overrides read by their types. On
``--resume`` the run's own settings come from the checkpoint; an option given again that differs is
applied where that is well defined (:data:`CHANGEABLE_ON_RESUME`) and refused otherwise. Every problem
is a :class:`RunConfigError` whose message names the option and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..models import ARCHITECTURES, CONFIGS, architecture_of
from ..models.configs import current_field_names, parse_model_args
from .checkpoint import read_checkpoint
from .optim import SCHEDULES, parse_drops, recipe_for
from .run_settings import (
    COCO_MAX_SIZE,
    COCO_SIZE,
    DATA_OPTIONS,
    DEFAULT_CONFIG,
    DIGITS_MAX_SIZE,
    DIGITS_SIZE,
    PER_INVOCATION,
    RunConfig,
    option_flag,
    uses_digits,
)

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "COCO_MAX_SIZE",
    "COCO_SIZE",
    "DEFAULT_CONFIG",
    "DIGITS_MAX_SIZE",
    "DIGITS_SIZE",
    "RunConfig",
    "RunConfigError",
    "build_run_config",
    "uses_digits",
]

#: Settings a resumed run may change: the length and learning rate of the schedule, and everything that
#: does not touch the training state (how often to evaluate and save, logging, loading, the test-time
#: refinement). Any other setting given again with another value is refused.
CHANGEABLE_ON_RESUME = frozenset(
    {
        "epochs", "lr_drops", "lr", "warmup_iters", "eval_every", "checkpoint_every", "keep_every",
        "print_freq", "log_steps", "workers", "device", "eval_batch_size", "deq_steps", "deq_tol",
        "deq_solver", "refinement_curve", "save_predictions", "skip_image_check", "amp", "amp_decoder",
        "find_unused_parameters",
    }
)  # fmt: skip
# Settings of the training alone: an evaluation refuses them rather than ignore them.
_TRAINING_ONLY = frozenset(
    {"epochs", "drops", "lr", "warmup_iters", "eval_every", "checkpoint_every", "keep_every", "log_steps",
     "find_unused_parameters"}
)  # fmt: skip
# Also changeable when only evaluating a checkpoint: the evaluation data and input size.
_CHANGEABLE_IN_EVAL = frozenset(
    {"val_ann", "val_images", "data_root", "image_size", "max_size", "max_iters", "output_dir"}
)


class RunConfigError(ValueError):
    """An option, or a combination of options, that the run cannot use; the message says what to change."""


_PATHS = (*DATA_OPTIONS, "output_dir")


def _from_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``args`` back to :class:`RunConfig` values (unknown entries dropped)."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    out = {k: v for k, v in saved.items() if k in names and k not in PER_INVOCATION}
    for k in _PATHS:
        if out.get(k) is not None:
            out[k] = Path(out[k])
    if "drops" in out:
        out["drops"] = tuple(out["drops"])
    if "overrides" in out:
        out["overrides"] = _saved_overrides(out["overrides"])
    return out


def _saved_overrides(saved: Mapping[str, Any]) -> dict[str, Any]:
    """Saved model overrides as the options read them: tuples for JSON's lists, fields by their current names
    (a run saved before a rename merges with the new spelling instead of differing from it)."""
    return current_field_names({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


_AT_LEAST_ONE = (
    "epochs",
    "batch_size",
    "eval_batch_size",
    "max_iters",
    "eval_every",
    "image_size",
    "max_size",
    "digits_train",
    "digits_val",
)
_AT_LEAST_ZERO = (
    "workers",
    "warmup_iters",
    "deq_steps",
    "checkpoint_every",
    "keep_every",
    "save_predictions",
    "refinement_curve",
    "print_freq",
)
# Finite floats, each with what it must exceed or reach: a negative multiplier or clipping norm would turn
# the optimisation around (a negative learning rate ascends, a negative norm flips every gradient).
_ABOVE_ZERO = ("lr", "decoder_lr_mult")
_NOT_NEGATIVE = ("weight_decay", "decoder_wd_mult", "clip_max_norm", "deq_tol")


_BOUNDS = (  # (options, the test a given value must pass, what the message says it must be)
    (_AT_LEAST_ONE, lambda v: v >= 1, "at least 1"),
    (_AT_LEAST_ZERO, lambda v: v >= 0, "at least 0"),
    (_ABOVE_ZERO, lambda v: v > 0 and math.isfinite(v), "a finite number > 0"),  # NaN fails every test
    (_NOT_NEGATIVE, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0"),
)


def _check_values(o: Mapping[str, Any]) -> None:
    for names, holds, bound in _BOUNDS:
        for name in names:
            value = o.get(name)
            if value is not None and not holds(value):
                raise RunConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
    if o.get("eval_only") and o.get("resume") is None:
        raise RunConfigError(
            "--eval-only evaluates a trained model: pass its run folder or checkpoint with --resume"
        )
    if o.get("overwrite") and o.get("resume") is not None:
        raise RunConfigError(
            "--overwrite starts a new run in place of an old one; it does not go with --resume"
        )


def _new_values(options: Mapping[str, Any], given: set[str]) -> dict[str, Any]:
    """The options given on the command line, as :class:`RunConfig` values."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    out = {k: v for k, v in options.items() if k in given and k in names}  # in the options' order
    if "model_arg" in given:
        try:
            out["overrides"] = parse_model_args(options["model_arg"])
        except ValueError as err:
            raise RunConfigError(str(err)) from None
    if "lr_drops" in given:
        try:
            out["drops"] = parse_drops(options["lr_drops"])
        except ValueError:
            raise RunConfigError(
                f"--lr-drops {options['lr_drops']!r}: give epochs separated by commas, e.g. 8,11"
            ) from None
    return out


# The model's test-time settings and the options that set them: one path into the model
# (``configure_test``), changeable on resume, whichever spelling the command line used.
_TEST_SETTINGS = {"test_steps": "deq_steps", "test_tol": "deq_tol", "test_solver": "deq_solver"}


def test_settings_of(options: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The model's test-time settings a run gives (``--deq-steps`` ...), by their names in the model
    (``test_steps`` ...): a :class:`RunConfig`, or the plain values a checkpoint saves of one."""
    values = options if isinstance(options, Mapping) else options.to_dict()
    return {key: values[option] for key, option in _TEST_SETTINGS.items() if values.get(option) is not None}


def _fold_test_settings(new: dict[str, Any], checkpoint: Mapping[str, Any] | None) -> None:
    """For a DEQ detector, move ``--model-arg test_steps=`` (``test_tol``, ``test_solver``) out of the
    model overrides to the option that sets the same thing (``--deq-steps`` ...), refusing the two spellings
    with different values. (A stack of stages has no test-time steps: there they stay unused overrides, like
    ``train_steps``, so that one recipe serves every detector.)"""
    overrides = new.get("overrides")
    if not overrides or not _TEST_SETTINGS.keys() & overrides.keys():
        return
    saved = (checkpoint or {}).get("args") or {}
    config = new.get("config") or saved.get("config") or ((checkpoint or {}).get("config") or {}).get("name")
    config = config or DEFAULT_CONFIG
    arch = overrides.get("arch") or (saved.get("overrides") or {}).get("arch")
    if config not in CONFIGS or arch not in (None, *ARCHITECTURES):
        return  # refused later, with its own message
    if not architecture_of(arch or CONFIGS[config].arch).deq:
        return
    for key, option in _TEST_SETTINGS.items():
        if key not in overrides:
            continue
        value = overrides.pop(key)
        if new.get(option) is not None and new[option] != value:
            raise RunConfigError(
                f"--model-arg {key}={value} and {option_flag(option)} {new[option]} set the same thing; give one"
            )
        new[option] = value


def _merge_resumed(
    saved: dict[str, Any], new: dict[str, Any], eval_only: bool, run_dir: Path
) -> dict[str, Any]:
    """The resumed run's values with the options given again applied, or a :class:`RunConfigError`."""
    changed: dict[str, tuple[Any, Any]] = {}
    allowed = CHANGEABLE_ON_RESUME | (_CHANGEABLE_IN_EVAL if eval_only else frozenset())
    allowed |= {"drops"}
    merged = dict(saved)
    if "output_dir" not in new or not eval_only:
        merged["output_dir"] = run_dir
    if eval_only:  # the training run's cap on batches (a smoke test's) is no measure of the model
        merged["max_iters"] = None
    for name, value in new.items():
        if name in PER_INVOCATION or name == "lr_drops":
            continue
        old = merged.get(name)
        if name == "overrides":
            value = {**(old or {}), **value}
        same_path = (
            name in _PATHS and None not in (value, old) and Path(value).resolve() == Path(old).resolve()
        )
        if same_path or value == old:
            continue
        if eval_only and name in _TRAINING_ONLY:
            raise RunConfigError(
                f"{option_flag(name)} {_show(value)}: an evaluation trains nothing, so a training setting other "
                f"than the run's ({_show(old)}) would have no effect; drop it"
            )
        if name not in allowed:
            raise RunConfigError(
                f"{option_flag(name)} {_show(value)} differs from the run being resumed ({_show(old)}); a resumed "
                f"run keeps it. Drop {option_flag(name)}, or start a new run without --resume"
                + (" (a resumed run continues in its own folder)" if name == "output_dir" else "")
            )
        changed[name] = (old, value)
        merged[name] = value
    if "epochs" in changed and changed["epochs"][1] < (changed["epochs"][0] or 0) and not eval_only:
        raise RunConfigError(
            f"--epochs {changed['epochs'][1]}: the run being resumed has {changed['epochs'][0]}; "
            "a resumed run can only be made longer"
        )
    merged["changed"] = changed
    return merged


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _fill_defaults(v: dict[str, Any]) -> dict[str, Any]:
    """A fresh run: schedule, recipe and input size from the config and the data where not given."""
    config = v.get("config") or DEFAULT_CONFIG
    if config not in CONFIGS:
        raise RunConfigError(f"unknown --config {config!r}; choose one of {sorted(CONFIGS)}")
    v["config"] = config
    overrides = v.get("overrides") or {}
    try:
        recipe = recipe_for(overrides.get("arch", CONFIGS[config].arch))
    except KeyError as err:
        raise RunConfigError(f"--model-arg arch: {err.args[0]}") from None
    for f in dataclasses.fields(recipe):
        if v.get(f.name) is None:
            v[f.name] = getattr(recipe, f.name)
    name = v.get("schedule") or next((s for s in SCHEDULES if config.endswith(s)), "1x")
    v["schedule"] = name
    schedule = SCHEDULES[name]
    if v.get("epochs") is not None and v["epochs"] != schedule.epochs:
        schedule = schedule.with_epochs(v["epochs"])
    v["epochs"] = schedule.epochs
    v.setdefault("drops", schedule.drops)
    digits = uses_digits(v)
    if v.get("image_size") is None:
        v["image_size"] = DIGITS_SIZE if digits else COCO_SIZE
    if v.get("max_size") is None:
        v["max_size"] = DIGITS_MAX_SIZE if digits else COCO_MAX_SIZE
    if v.get("output_dir") is None:
        v["output_dir"] = Path("outputs") / config
    return v


def build_run_config(
    options: Mapping[str, Any], given: set[str], checkpoint: Mapping[str, Any] | None = None
) -> RunConfig:
    """Resolve and check a run's settings.

    Arguments:
        options: every option's value (``vars()`` of the parsed command line).
        given: the options the command line named (the others hold their defaults).
        checkpoint: the ``--resume`` checkpoint dict, whose ``args`` are the resumed run's settings.

    Returns:
        A :class:`RunConfig`.

    Raises:
        :class:`RunConfigError` naming the option to change.
    """
    new = _new_values(options, given)
    digits_options = sorted({"digits_train", "digits_val"} & new.keys())
    if digits_options and not uses_digits({**options, **new}):
        raise RunConfigError(
            f"{option_flag(digits_options[0])} sizes the bundled digits set, which a run on COCO-format data "
            "(--data-root or the annotation options) does not use; drop it"
        )
    _fold_test_settings(new, checkpoint)
    _check_values({**options, **new})
    eval_only = bool(options.get("eval_only"))
    if checkpoint is None:
        defaults = {k: options[k] for k in options if k in {f.name for f in dataclasses.fields(RunConfig)}}
        values = _fill_defaults({**defaults, **new})
    else:
        resume = Path(options["resume"])
        run_dir = resume if resume.is_dir() else resume.parent
        args = checkpoint.get("args") or {}
        # A checkpoint from before the settings were saved whole (no "overrides"): only its model config is
        # taken, the rest from today's options.
        saved = _from_saved(args) if "overrides" in args else {}
        model = checkpoint.get("config") or {}
        saved.setdefault("config", model.get("name", DEFAULT_CONFIG))
        saved.setdefault("overrides", _saved_overrides(model.get("overrides") or {}))
        if "input_size" in model:
            saved.setdefault("image_size", model["input_size"][0])
            saved.setdefault("max_size", model["input_size"][1])
        if "overrides" not in args:
            base = {k: options[k] for k in options if k in {f.name for f in dataclasses.fields(RunConfig)}}
            saved = _fill_defaults({**base, **new, **saved})
        values = _merge_resumed(saved, new, eval_only, run_dir)
        values["resumed_from"] = Path(options["resume"])
        if not eval_only:
            _refuse_rewinding(resume, checkpoint, Path(values["output_dir"]))
    for k in PER_INVOCATION[1:]:
        values[k] = bool(options.get(k))
    values.pop("resume", None)
    names = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in values.items() if k in names})
    _check_config(cfg)
    return cfg


def _refuse_rewinding(resume: Path, checkpoint: Mapping[str, Any], output_dir: Path) -> None:
    """Training on from an older checkpoint of a run (``checkpoint_best.pth``, ``checkpoint_epoch3.pth``) in
    that run's own folder would overwrite its later checkpoints and log its later epochs twice."""
    last = output_dir / "checkpoint_last.pth"
    if resume.is_dir() or resume.name in ("checkpoint_last.pth", "checkpoint.pth"):
        return
    if resume.resolve().parent != output_dir.resolve():
        return
    epoch = _position(checkpoint)[0]
    # A later epoch's kept checkpoint says so too, when checkpoint_last.pth is gone.
    later = sorted(p.name for p in output_dir.glob("checkpoint_epoch*.pth") if _epoch_of(p) > epoch)
    if (last.is_file() and _position(checkpoint) < _position(_read_position(last))) or later:
        newer = last.name if last.is_file() else later[-1]
        raise RunConfigError(
            f"--resume {resume} trains on from an earlier checkpoint of the run in {output_dir}, where it would "
            f"overwrite {newer} and log the later epochs again. To train a branch from it, copy it into a "
            f"new folder as checkpoint_last.pth and resume that folder; to continue the run, resume {output_dir}"
        )


def _epoch_of(path: Path) -> int:
    """N of ``checkpoint_epochN.pth`` (-1 for another name)."""
    digits = path.stem.removeprefix("checkpoint_epoch")
    return int(digits) if digits.isdigit() else -1


def _read_position(path: Path) -> dict[str, Any]:
    """The run's latest checkpoint, memory-mapped (its position is a few numbers), or an error that says why
    it was read."""
    try:
        return read_checkpoint(path, mmap=True)
    except ValueError as err:
        raise RunConfigError(
            f"{err}. It was read as the run's latest checkpoint, to tell whether --resume goes back in the run; "
            "if a crash while saving damaged it, move it aside to resume from another"
        ) from err


def _position(checkpoint: Mapping[str, Any]) -> tuple[int, int]:
    """``(epoch, iterations done in it)`` of a checkpoint; an epoch-end one from before ``progress`` was saved
    counts its epoch as done."""
    progress = checkpoint.get("progress") or {}
    return int(progress.get("epoch", checkpoint.get("epoch", 0))), int(progress.get("iteration", 1 << 30))


def _check_config(cfg: RunConfig) -> None:
    if cfg.config not in CONFIGS:
        raise RunConfigError(f"unknown --config {cfg.config!r}; choose one of {sorted(CONFIGS)}")
    if cfg.image_size >= cfg.max_size:
        raise RunConfigError(
            f"--image-size {cfg.image_size} must be smaller than --max-size {cfg.max_size} (the cap on the "
            "longer side); raise --max-size or lower --image-size"
        )
    try:
        cfg.lr_schedule()
    except ValueError as err:
        raise RunConfigError(f"--epochs / --lr-drops: {err}") from None
    if any(d >= cfg.epochs for d in cfg.drops):
        raise RunConfigError(
            f"--lr-drops {_show(cfg.drops)}: every drop must come before the last epoch (--epochs {cfg.epochs})"
        )
    if cfg.amp_decoder and not cfg.amp:
        raise RunConfigError("--amp-decoder widens --amp to the decoder: give --amp too")
    arch = cfg.overrides.get("arch", CONFIGS[cfg.config].arch)
    row = architecture_of(arch)
    if cfg.deq_steps is not None and not row.deq:
        raise RunConfigError(
            f"--deq-steps: {cfg.config} ({arch}) has no test-time step count (not a DEQ model)"
        )
    if (cfg.deq_tol is not None or cfg.deq_solver is not None) and not row.early_exit:
        early = sorted(name for name, a in ARCHITECTURES.items() if a.early_exit)
        raise RunConfigError(
            f"--deq-tol / --deq-solver: {cfg.config} ({arch}) has no early exit ({', '.join(early)} has)"
        )
    if cfg.deq_solver not in (None, "fixed") and cfg.deq_tol is None:
        raise RunConfigError(
            f"--deq-solver {cfg.deq_solver}: the solver runs only with an early exit; give --deq-tol too (e.g. "
            "--deq-tol 1e-3), or drop --deq-solver: without a tolerance F is applied exactly --deq-steps times"
        )
