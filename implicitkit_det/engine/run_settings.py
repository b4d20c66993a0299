"""Every setting of a run, with its default and its command-line option in one place.

Each field of :class:`RunConfig` that the command line sets carries the option's help text and argparse
details in its metadata (:func:`option`); :func:`implicitkit_det.cli.build_parser` builds the parser from
them, so a setting has one default and one help text. A field marked ``resolved`` has no command-line
default: :func:`~implicitkit_det.engine.run_config.build_run_config` fills it in from the config's recipe,
the schedule or the data, and its field default only serves a :class:`RunConfig` built directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .optim import SCHEDULES, Schedule

__all__ = [
    "COCO_MAX_SIZE",
    "COCO_SIZE",
    "DATA_OPTIONS",
    "DEFAULT_CONFIG",
    "DIGITS_MAX_SIZE",
    "DIGITS_SIZE",
    "PER_INVOCATION",
    "RunConfig",
    "option",
    "option_flag",
    "uses_digits",
]

DEFAULT_CONFIG = "deqdet_tiny"
# Shorter side / longer-side cap of the network input: COCO's standard sizes, and the digits set's native
# scale (its canvases are 128-192 pixels).
COCO_SIZE, COCO_MAX_SIZE = 800, 1333
DIGITS_SIZE, DIGITS_MAX_SIZE = 160, 256
#: Per invocation, never taken from a checkpoint.
PER_INVOCATION = ("resume", "eval_only", "overwrite")
_RECIPE = "default: the config's recipe (its row of models.ARCHITECTURES; DEQDet: {}, Sparse R-CNN: {})"


def option(default: Any, group: str, help: str, *, resolved: bool = False, **argparse_kwargs: Any) -> Any:
    """A :class:`RunConfig` field set by a command-line option of `group` (``model``, ``data``,
    ``optimisation`` or ``run``).

    Arguments:
        default: the field's default (and the option's, unless `resolved`).
        help: the option's help text.
        resolved: the option defaults to None and :func:`build_run_config` resolves it.
        argparse_kwargs: passed on to ``add_argument`` (``choices``, ``metavar``, ``action``, ``type``,
            ``flag`` for an option named other than ``--field-name``).
    """
    meta = {"group": group, "help": help, "resolved": resolved, **argparse_kwargs}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


def option_flag(name: str) -> str:
    """The command-line option that sets :class:`RunConfig` field `name` (``--lr-drops`` for ``drops``)."""
    field_ = RunConfig.__dataclass_fields__.get(name)
    return (field_.metadata if field_ else {}).get("flag", "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a run, resolved (each field's metadata holds its option's help).

    ``drops`` are the resolved learning-rate drops; ``overrides`` the typed model-config changes;
    ``resumed_from`` the checkpoint file of a resumed run and ``changed`` the options a resume changed
    (``{name: (old, new)}``).
    """

    # -- model
    config: str = option(
        DEFAULT_CONFIG, "model", f"model config name (default {DEFAULT_CONFIG}, or the --resume checkpoint's)",
        resolved=True,
    )  # fmt: skip
    deq_steps: int | None = option(
        None, "model", "test-time refinement steps (DEQ models); --model-arg test_steps=N (test_tol, "
        "test_solver) is the same option",
    )  # fmt: skip
    deq_tol: float | None = option(
        None, "model", "DEQDet early exit: stop each image once its state changes by at most this (RMS per "
        "query of the scaled state, see docs/deqdet.md); at most --deq-steps steps. Default: the fixed step count",
    )  # fmt: skip
    deq_solver: str | None = option(
        None, "model", "DEQDet early exit: plain iteration or Anderson acceleration (default fixed)",
        choices=("fixed", "anderson"),
    )  # fmt: skip
    overrides: Mapping[str, Any] = option(
        {}, "model", "override a model config entry (repeatable), read by the field's type: --model-arg "
        "num_queries=50, neck_relu=false, supervise_steps=1,3,6, test_tol=none",
        flag="--model-arg", action="append", metavar="KEY=VALUE",
    )  # fmt: skip
    # -- data
    data_root: Path | None = option(None, "data", "COCO folder: train2017/, val2017/, annotations/")
    train_ann: Path | None = option(None, "data", "training annotation file (overrides --data-root's)")
    val_ann: Path | None = option(None, "data", "validation annotation file")
    train_images: Path | None = option(None, "data", "training image folder")
    val_images: Path | None = option(None, "data", "validation image folder")
    digits_train: int = option(1000, "data", "images in the bundled set's train split")
    digits_val: int = option(200, "data", "images in the bundled set's val split")
    image_size: int = option(
        DIGITS_SIZE,
        "data",
        f"shorter side of the input (COCO {COCO_SIZE}, digits {DIGITS_SIZE})",
        resolved=True,
    )
    max_size: int = option(
        DIGITS_MAX_SIZE, "data", f"cap on the longer side (COCO {COCO_MAX_SIZE}, digits {DIGITS_MAX_SIZE})",
        resolved=True,
    )  # fmt: skip
    workers: int = option(2, "data", "data-loading processes per training process")
    keep_empty_images: bool = option(
        False, "data", "keep training images without boxes (default: left out, as the official pipeline does)"
    )
    no_aspect_grouping: bool = option(
        False,
        "data",
        "batch training images in plain sampler order (default: wide and tall images batched apart)",
    )
    # -- optimisation
    schedule: str = option(
        "1x",
        "optimisation",
        "default: from the config name, else 1x",
        resolved=True,
        choices=sorted(SCHEDULES),
    )
    epochs: int = option(
        12, "optimisation", "default: the schedule's (12 for 1x, 24 for 2x, 36 for 3x)", resolved=True
    )
    drops: tuple[int, ...] = option(
        (8, 11), "optimisation", "epochs where the lr drops 10x, e.g. 8,11 (default: the schedule's, scaled to "
        "--epochs; on --resume the run's, unless given)", resolved=True, flag="--lr-drops", type=str,
    )  # fmt: skip
    warmup_iters: int = option(500, "optimisation", "iterations of linear learning-rate warm-up")
    batch_size: int = option(2, "optimisation", "images per process (total = this x processes)")
    eval_batch_size: int | None = option(
        None, "optimisation", "evaluation images per process (default: 1 for COCO-format data, as the official "
        "test runs; --batch-size for the digits set)",
    )  # fmt: skip
    lr: float = option(
        2.5e-5, "optimisation", "base AdamW learning rate; " + _RECIPE.format(2.5e-5, 2.5e-5), resolved=True
    )
    weight_decay: float = option(0.01, "optimisation", _RECIPE.format(0.01, 1e-4), resolved=True)
    decoder_lr_mult: float = option(4.0, "optimisation", _RECIPE.format(4, 1), resolved=True)
    decoder_wd_mult: float = option(10.0, "optimisation", _RECIPE.format(10, 1), resolved=True)
    no_decay_norm_bias: bool = option(False, "optimisation", "no weight decay on biases and norm layers")
    clip_max_norm: float = option(
        1.0, "optimisation", "gradient clipping (0: off); " + _RECIPE.format(1, 1), resolved=True
    )
    amp: bool = option(
        False, "optimisation", "mixed precision for the backbone and the neck: bf16 on the CPU, fp16 + grad "
        "scaling on CUDA (the decoder stays in float32); --no-amp turns off a recipe's",
        action="boolean_optional",
    )  # fmt: skip
    amp_decoder: bool = option(
        False, "optimisation", "with --amp, the decoder in low precision too", action="boolean_optional"
    )
    one_graph_backward: bool = option(
        False, "optimisation", "build one graph of all supervised branches and back-propagate it once, instead "
        "of branch by branch (the same gradients, more memory)",
    )  # fmt: skip
    # -- run
    device: str | None = option(None, "run", "cuda or cpu (default: cuda when available)")
    seed: int = option(0, "run", "seed of the weights, the data order and the augmentation")
    output_dir: Path = option(
        Path("outputs") / DEFAULT_CONFIG, "run", "run folder (default: outputs/<config>). A folder holding an "
        "earlier run is left untouched: the new run goes to <folder>-run2 (-run3, ...) unless --overwrite",
        resolved=True,
    )  # fmt: skip
    overwrite: bool = option(False, "run", "delete the earlier run's files in --output-dir and start anew")
    eval_only: bool = option(False, "run", "evaluate the --resume checkpoint and stop")
    eval_every: int = option(1, "run", "evaluate every N epochs (and after the last)")
    checkpoint_every: int = option(
        0, "run", "also save checkpoint_last.pth every N iterations (0: at the end of each epoch only); a "
        "resumed run continues from that iteration with the same data", metavar="N",
    )  # fmt: skip
    keep_every: int = option(
        0, "run", "keep a copy of the checkpoint of every K-th epoch (checkpoint_epoch<N>.pth); 0: none",
        metavar="K",
    )  # fmt: skip
    skip_image_check: bool = option(
        False, "run", "do not open every image before training (for trusted data: a bad image then stops the "
        "run when it is loaded)", action="boolean_optional",
    )  # fmt: skip
    log_steps: bool = option(
        False, "run", "write one JSON line per iteration to steps.jsonl", action="boolean_optional"
    )
    max_iters: int | None = option(
        None, "run", "at most N training iterations per epoch and N evaluation batches"
    )
    print_freq: int = option(20, "run", "a progress line every N iterations")
    refinement_curve: int | None = option(
        None, "run", "after the last evaluation, score the model after 0..N test-time refinement steps (a "
        "stack of stages: each stage, then its last one again) (refinement_curve.json and .png in the output "
        "folder); 0: none, also for an evaluation of a run that drew one", metavar="N",
    )  # fmt: skip
    save_predictions: int = option(
        0, "run", "after the last evaluation, draw K val images, ground truth beside predictions "
        "(predictions.png); 0: none", metavar="K",
    )  # fmt: skip
    find_unused_parameters: bool = option(
        False, "run", "DDP option for models with unused parameters", action="boolean_optional"
    )
    # -- set by build_run_config, not by an option
    resumed_from: Path | None = None
    changed: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def on_digits(self) -> bool:
        """Whether the run uses the bundled digits set (no data option given)."""
        return uses_digits({k: getattr(self, k) for k in DATA_OPTIONS})

    def lr_schedule(self) -> Schedule:
        """The learning-rate :class:`~.optim.Schedule` in force."""
        return Schedule(self.epochs, self.drops, warmup_iters=self.warmup_iters)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings, tuples as lists): what ``config.json`` and checkpoints hold."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("resumed_from", "changed", *PER_INVOCATION):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value.resolve())  # a resumed run may start from another folder
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[f.name] = value
        return out


#: The options that name a dataset: with none of them a run uses the bundled digits set.
DATA_OPTIONS = ("data_root", "train_ann", "val_ann", "train_images", "val_images")


def uses_digits(values: Mapping[str, Any]) -> bool:
    """Whether settings (the command line's values, keyed like :class:`RunConfig`'s fields) name no dataset,
    so that the run uses the bundled digits set: the one answer to that question."""
    return all(values.get(k) is None for k in DATA_OPTIONS)
