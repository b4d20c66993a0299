"""The detector table: one row per architecture, everything the engine and the command line need to know.

A row (:class:`Architecture`) names the builder (``ModelConfig, num_classes -> QueryDetector``) and the
config fields it reads, the AdamW recipe the family was published with, whether it is a deep-equilibrium
detector (test-time steps can be changed), whether it exits early at a tolerance, how the digits demo
trains it, and the named configurations the command line's ``--config`` offers. Adding a detector is one model file (the
:class:`~.detector.QueryDetector` subclass and its builder) and one row: a new entry in
:data:`ARCHITECTURES`, or :func:`register_detector` from a user's own code. See docs/adding_a_detector.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .backbone import PRETRAINED_FROZEN_STAGES, PRETRAINED_NORM
from .configs import (
    ADAMIXER_FIELDS,
    ADAMIXER_R50,
    DEQ_SPARSE_RCNN_FIELDS,
    DEQ_SPARSE_RCNN_R50,
    DEQDET_FIELDS,
    DEQDET_R50,
    SPARSE_RCNN_FIELDS,
    SPARSE_RCNN_R50,
    SPARSE_TINY,
    TINY,
    ModelConfig,
    build_adamixer,
    build_deq_sparse_rcnn,
    build_deqdet,
    build_sparse_rcnn,
    current_field_names,
)
from .detector import QueryDetector

__all__ = [
    "ARCHITECTURES",
    "CONFIGS",
    "RECIPES",
    "Architecture",
    "DemoRecipe",
    "OptimizerRecipe",
    "architecture_of",
    "build_model",
    "register_detector",
    "unread_overrides",
]


@dataclass(frozen=True)
class OptimizerRecipe:
    """The AdamW settings a detector family was published with (the arguments of ``param_groups``).

    Arguments:
        lr, weight_decay: the base values.
        decoder_lr_mult, decoder_wd_mult: multipliers for the decoder's parameters.
        clip_max_norm: gradient clipping threshold (total 2-norm).
    """

    lr: float = 2.5e-5
    weight_decay: float = 0.01
    decoder_lr_mult: float = 4.0
    decoder_wd_mult: float = 10.0
    clip_max_norm: float = 1.0


@dataclass(frozen=True)
class DemoRecipe:
    """How the digits demo trains a detector (:func:`implicitkit_det.recipes.digits_recipe`), on top of the
    shapes every demo shares (input size, queries, batch, warm-up): command-line settings of its own.

    Arguments:
        lr: the base learning rate (a short run: the published rates are for 12-36 COCO epochs at batch 16).
        decoder_lr_mult, decoder_wd_mult: the decoder's multipliers of the learning rate and weight decay.
        epochs, lr_drops: the schedule (the rate drops 10x at the start of each epoch in `lr_drops`).
        amp: bfloat16 autocast for the backbone and neck (``--amp``).
        model_args: ``KEY=VALUE`` model-config changes (``--model-arg``).
    """

    lr: float = 6e-4
    decoder_lr_mult: float = 1.0
    decoder_wd_mult: float = 1.0
    epochs: int = 5
    lr_drops: tuple[int, ...] = (4,)
    amp: bool = False
    model_args: tuple[str, ...] = ()

    def options(self) -> list[str]:
        """The recipe as command-line options."""
        args = ["--lr", f"{self.lr:g}", "--decoder-lr-mult", f"{self.decoder_lr_mult:g}"]
        args += ["--decoder-wd-mult", f"{self.decoder_wd_mult:g}", "--epochs", str(self.epochs)]
        args += ["--lr-drops", ",".join(map(str, self.lr_drops))]
        args += ["--amp"] if self.amp else []
        for item in self.model_args:
            args += ["--model-arg", item]
        return args


@dataclass(frozen=True)
class Architecture:
    """One row of the detector table.

    Arguments:
        build: ``build(config, num_classes)`` returns the detector in training mode.
        recipe: the optimiser settings a fresh run starts from (options given on the command line win).
        deq: a deep-equilibrium detector: ``--deq-steps`` changes its test-time step count.
        early_exit: it stops refining at a tolerance (``--deq-tol``, ``--deq-solver``).
        demo: how the digits demo trains it (:class:`DemoRecipe`).
        configs: the named configurations ``--config`` offers, each with ``arch`` set to this row's name.
        reads: the :class:`~.configs.ModelConfig` fields `build` reads (``arch`` aside): :func:`build_model`
            refuses an override of any other, which the builder would ignore. None (a row that does not say)
            accepts every field.
        read_only_with: fields of `reads` that `build` reads only when a boolean field is true, e.g.
            ``{"gn_groups": "fpn_norm"}``: with it false, an override of the first is refused too.
    """

    build: Callable[[ModelConfig, int], QueryDetector]
    recipe: OptimizerRecipe = OptimizerRecipe()
    deq: bool = False
    early_exit: bool = False
    demo: DemoRecipe = DemoRecipe()
    configs: Mapping[str, ModelConfig] = field(default_factory=dict)
    reads: frozenset[str] | None = None
    read_only_with: Mapping[str, str] = field(default_factory=dict)


# AdaMixer's and Sparse R-CNN's published configurations: one learning rate and weight decay for all; the
# DEQ Sparse R-CNN head ships no configuration of its own and takes Sparse R-CNN's. To train AdaMixer with
# DEQDet's settings instead (a like-for-like comparison): --weight-decay 0.01 --decoder-lr-mult 4
# --decoder-wd-mult 10.
_UNIFORM_RECIPE = OptimizerRecipe(weight_decay=1e-4, decoder_lr_mult=1.0, decoder_wd_mult=1.0)
_R300 = {"num_queries": 300, "num_select": 300}

# The digits demo of DEQDet (docs/training.md, "What it reaches"): bf16 backbone and neck and (in the tiny
# preset) stacked branches buy 7 epochs in about the time 5 took; NMS removes the duplicates that a 5-minute
# training leaves (AP 0.26 -> 0.46 on the same checkpoint, and a refinement curve that no longer falls).
# RAP perturbs the content only: at this scale its box noise costs AP (docs/reproduction.md, 3 seeds:
# 58.3 +- 0.8 with content noise only against 52.0 +- 3.2 with both), at the same cost per step. The
# queries start on a grid of cells instead of all on the whole image: told apart from the first step, they
# learn faster (docs/training.md, 3 seeds: AP 0.636 +- 0.012 against 0.583 +- 0.008). The channels-last
# stem and reused host memory (x1.11 per step) buy an 8th epoch in the same 5 minutes (3 seeds: 0.671 +-
# 0.016 against 0.636 +- 0.012 after 7). Every branch stacked (x1.11 again) left the AP within the seeds'
# spread (0.662 +- 0.014); a 9th epoch in the time saved did not pay (docs/training.md).
_DEQDET_DEMO = DemoRecipe(
    lr=6e-4,
    epochs=8,
    lr_drops=(7,),
    amp=True,
    model_args=("nms_iou=0.7", "rap_box_prob=0", "query_boxes=grid"),
)

# AdaMixer's: the same, in 12 epochs (about 7 minutes on two cores: AP 0.615, docs/training.md).
_ADAMIXER_DEMO = DemoRecipe(lr=6e-4, epochs=12, lr_drops=(11,), amp=True, model_args=("nms_iou=0.7",))

# The Sparse R-CNNs': at a learning rate this high their plain FPN collapses (every image gets the same boxes,
# docs/sparse_rcnn.md); GroupNorm after the FPN's convolutions (mmdetection's FPN norm_cfg) keeps the
# features per image in range, and Sparse R-CNN reaches AP 0.62 in 12 epochs.
_SPARSE_DEMO = DemoRecipe(
    lr=6e-4, epochs=12, lr_drops=(11,), amp=True, model_args=("nms_iou=0.7", "fpn_norm=true")
)

# DEQ Sparse R-CNN's steps cost 1.5x Sparse R-CNN's: 8 epochs fit in 10 minutes (AP 0.59 after 8 of a
# 12-epoch run).
_DEQ_SPARSE_DEMO = dataclasses.replace(_SPARSE_DEMO, epochs=8, lr_drops=(7,))

#: The detector table, keyed by ``ModelConfig.arch``.
ARCHITECTURES: dict[str, Architecture] = {
    "deqdet": Architecture(
        build_deqdet, OptimizerRecipe(), deq=True, early_exit=True, demo=_DEQDET_DEMO,
        configs={
            "deqdet_r50_1x": DEQDET_R50,
            "deqdet_r50_2x": dataclasses.replace(DEQDET_R50, **_R300),
            "deqdet_tiny": dataclasses.replace(DEQDET_R50, **TINY, rap_box_pixels=4.0),
        },
        reads=DEQDET_FIELDS,
    ),
    "adamixer": Architecture(
        build_adamixer, _UNIFORM_RECIPE, demo=_ADAMIXER_DEMO,
        configs={"adamixer_r50_1x": ADAMIXER_R50, "adamixer_tiny": dataclasses.replace(ADAMIXER_R50, **TINY)},
        reads=ADAMIXER_FIELDS,
    ),
    "sparse_rcnn": Architecture(
        build_sparse_rcnn, _UNIFORM_RECIPE, demo=_SPARSE_DEMO,
        configs={
            "sparse_rcnn_r50_1x": SPARSE_RCNN_R50,
            "sparse_rcnn_r50_3x": dataclasses.replace(SPARSE_RCNN_R50, **_R300),
            "sparse_rcnn_tiny": dataclasses.replace(SPARSE_RCNN_R50, **SPARSE_TINY),
        },
        reads=SPARSE_RCNN_FIELDS,
        read_only_with={"gn_groups": "fpn_norm"},
    ),
    "deq_sparse_rcnn": Architecture(
        build_deq_sparse_rcnn, _UNIFORM_RECIPE, deq=True, demo=_DEQ_SPARSE_DEMO,
        configs={
            "deq_sparse_rcnn_r50_1x": DEQ_SPARSE_RCNN_R50,
            "deq_sparse_rcnn_r50_3x": dataclasses.replace(DEQ_SPARSE_RCNN_R50, **_R300),
            "deq_sparse_rcnn_tiny": dataclasses.replace(DEQ_SPARSE_RCNN_R50, **SPARSE_TINY, rap_box_pixels=4.0),
        },
        reads=DEQ_SPARSE_RCNN_FIELDS,
        read_only_with={"gn_groups": "fpn_norm"},
    ),
}  # fmt: skip


class _TableView(Mapping):
    """A read-only, always current view of one column of :data:`ARCHITECTURES`."""

    def __init__(self, rows: Callable[[], Iterator[tuple[str, Any]]]) -> None:
        self._rows = rows

    def __getitem__(self, key: str) -> Any:
        for name, value in self._rows():
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._rows())

    def __len__(self) -> int:
        return sum(1 for _ in self._rows())


#: Every named configuration of every architecture (``--config``'s choices).
CONFIGS: Mapping[str, ModelConfig] = _TableView(
    lambda: ((name, c) for a in ARCHITECTURES.values() for name, c in a.configs.items())
)
#: The optimiser recipe of each architecture.
RECIPES: Mapping[str, OptimizerRecipe] = _TableView(lambda: ((n, a.recipe) for n, a in ARCHITECTURES.items()))


def register_detector(name: str, architecture: Architecture) -> None:
    """Add a row to :data:`ARCHITECTURES` from outside the package (a new detector, a test's toy one).

    Raises ``ValueError`` when the name or one of its configuration names is taken, or a configuration's
    ``arch`` is not `name`.
    """
    if name in ARCHITECTURES:
        raise ValueError(f"a detector named {name!r} is registered already")
    for config_name, config in architecture.configs.items():
        if config_name in CONFIGS:
            raise ValueError(
                f"the configuration name {config_name!r} is taken (by {CONFIGS[config_name].arch})"
            )
        if config.arch != name:
            raise ValueError(f"configuration {config_name!r} has arch={config.arch!r}; set arch={name!r}")
    ARCHITECTURES[name] = architecture


def architecture_of(arch: str) -> Architecture:
    """The row of `arch` (a ``ModelConfig.arch``); ``KeyError`` listing the known ones."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown arch {arch!r}; choose one of {sorted(ARCHITECTURES)} or register one")
    return ARCHITECTURES[arch]


def build_model(config: str | ModelConfig, num_classes: int, **overrides: Any) -> QueryDetector:
    """Build a detector from a named (or given) configuration.

    Arguments:
        config: a key of :data:`CONFIGS` (``deqdet_r50_1x``, ``deqdet_r50_2x``, ``adamixer_r50_1x``,
            ``sparse_rcnn_r50_1x``, ``sparse_rcnn_r50_3x``, ``deq_sparse_rcnn_r50_1x``,
            ``deq_sparse_rcnn_r50_3x``, and the CPU-sized ``deqdet_tiny``, ``adamixer_tiny``,
            ``sparse_rcnn_tiny``, ``deq_sparse_rcnn_tiny``) or a :class:`~.configs.ModelConfig`.
        num_classes: classes of the sigmoid classifier (80 for COCO, 10 for the digits set).
        **overrides: fields of :class:`~.configs.ModelConfig` to change, e.g. ``num_queries=50`` or
            ``backbone_weights="IMAGENET1K_V1"``; only fields the architecture reads (its row's ``reads``).

    Returns:
        The detector its architecture's builder makes (:class:`~.deqdet.DEQDet`, :class:`~.adamixer.AdaMixer`,
        :class:`~.sparse_rcnn.SparseRCNN`, :class:`~.deq_sparse_rcnn.DEQSparseRCNN` or a registered one), in
        training mode. Build on the meta device (``with torch.device("meta"): ...``) to inspect shapes and
        parameter counts without allocating memory.

    Raises:
        ``ValueError`` for an override the architecture does not read (naming the ones that do) or a value
        :class:`~.configs.ModelConfig` refuses; ``KeyError`` for an unknown config name.
    """
    label = config if isinstance(config, str) else "the config"
    config = _named_config(config)
    overrides = current_field_names(overrides)
    arch = overrides.get("arch", config.arch)
    try:
        row = architecture_of(arch)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    # Checked before the values: a field the builder never reads is the first thing to fix.
    unread = unread_overrides(config, overrides)
    if unread:
        given = ", ".join(f"{key}={overrides[key]!r}{_readers(key)}" for key in unread)
        it = "it" if len(unread) == 1 else "them"
        raise ValueError(
            f"{label} ({arch}) does not read {given}: its builder would ignore {it}; drop {it}, or build a "
            f"config of an architecture that reads {it}"
        )
    return row.build(dataclasses.replace(config, **overrides), num_classes)


def _readers(field_name: str) -> str:
    """`` (read by deqdet, ...)``: the rows that read `field_name`, for a refusal's message."""
    rows = sorted(
        a + (f" with {row.read_only_with[field_name]}=true" if field_name in row.read_only_with else "")
        for a, row in ARCHITECTURES.items()
        if row.reads is not None and field_name in row.reads
    )
    return f" (read by {', '.join(rows)})" if rows else ""


def _named_config(config: str | ModelConfig) -> ModelConfig:
    if isinstance(config, str):
        if config not in CONFIGS:
            raise KeyError(f"unknown model config {config!r}; choose one of {sorted(CONFIGS)}")
        return CONFIGS[config]
    return config


def unread_overrides(config: str | ModelConfig, overrides: Mapping[str, Any]) -> list[str]:
    """The fields in `overrides` (under their current names) that the architecture of `config` (or of
    ``overrides["arch"]``) does not read and that change its value: what :func:`build_model` refuses.

    An override equal to the config's own value changes nothing and is not counted (generic code may pass
    ``test_tol=None`` to every detector). Empty for a row without ``reads``; names that are no
    :class:`~.configs.ModelConfig` field are left to ``build_model``'s own refusal.

    Raises:
        ``KeyError`` for an unknown config name or architecture.
    """
    config = _named_config(config)
    overrides = current_field_names(overrides)
    row = architecture_of(overrides.get("arch", config.arch))
    reads = row.reads
    if reads is None:
        return []
    # A field read only under a switch that is off is as unread as one the builder never looks at.
    reads = reads - {
        f for f, switch in row.read_only_with.items() if not overrides.get(switch, getattr(config, switch))
    }
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"arch"}  # arch picks the row: always read
    return [
        name
        for name, value in overrides.items()
        if name in fields and name not in reads and not _same(value, getattr(config, name))
    ]


def read_overrides(
    config: str | ModelConfig, overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """`overrides` (under their current names) split into what `config`'s architecture reads and what it does
    not (:func:`unread_overrides`), for a caller that hands one set of options to every detector (the digits
    demo's shared shapes, a run saved with them): build with the first, name the second.
    """
    unread = unread_overrides(config, overrides)
    kept = {k: v for k, v in current_field_names(overrides).items() if k not in unread}
    return kept, unread


def with_backbone_layout(config: str | ModelConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` with a pre-trained backbone's layout written out: its norm and frozen stages, the defaults
    :class:`~.backbone.ResNetBackbone` takes when it is given weights (and not without). A checkpoint keeps
    them so, and a model rebuilt from its options without the weights file has the same layout."""
    preset = _named_config(config)
    overrides = current_field_names(overrides)
    if overrides.get("backbone_weights", preset.backbone_weights) is None:
        return dict(overrides)
    norm = overrides.get("backbone_norm", preset.backbone_norm)
    frozen = overrides.get("frozen_stages", preset.frozen_stages)
    return {
        **overrides,
        "backbone_norm": PRETRAINED_NORM if norm is None else norm,
        "frozen_stages": PRETRAINED_FROZEN_STAGES if frozen is None else frozen,
    }


def without_weight_files(config: str | ModelConfig, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` for a model whose weights a checkpoint will replace: the pre-trained backbone's layout
    (:func:`with_backbone_layout`) without the weights file, which a resumed, evaluated or deployed run need
    not have (a cleared cache, another machine). The state dict and the trainable parameters are the same."""
    laid_out = with_backbone_layout(config, overrides)
    if laid_out.get("backbone_weights", _named_config(config).backbone_weights) is None:
        return laid_out
    return {**laid_out, "backbone_weights": None}


def _same(value: Any, default: Any) -> bool:
    """An override equal to a field's value (a list given for a tuple field counts as equal)."""
    if isinstance(value, list | tuple) and isinstance(default, list | tuple):
        return tuple(value) == tuple(default)
    return value == default
