"""Every choice that shapes a detector (:class:`ModelConfig`), the builders of the four architectures, and
``KEY=VALUE`` overrides. The named configurations and ``build_model`` are in :mod:`.registry`."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..losses import SetCriterion
from .adamixer import AdaMixer
from .adamixer_stage import AdaMixerStage
from .backbone import ResNetBackbone
from .deq_sparse_rcnn import DEQSparseRCNN
from .deqdet import DEQDet, check_supervise_steps
from .fpn import FPN
from .neck import ChannelMapper
from .proposals import LearnedProposals
from .queries import InitialQueries, QueryBoxes
from .rap import RAP, SparseRCNNRAP
from .sparse_rcnn import SparseRCNN
from .sparse_rcnn_stage import SparseRCNNStage

__all__ = [
    "ADAMIXER_FIELDS",
    "COMMON_FIELDS",
    "DEQDET_FIELDS",
    "DEQ_SPARSE_RCNN_FIELDS",
    "SPARSE_RCNN_FIELDS",
    "ModelConfig",
    "build_adamixer",
    "build_deq_sparse_rcnn",
    "build_deqdet",
    "build_sparse_rcnn",
    "current_field_names",
    "make_backbone",
    "parse_model_args",
]


@dataclass(frozen=True)
class ModelConfig:
    """Every choice that shapes a detector; :func:`build_model` turns one into a model.

    Attributes:
        arch: a row of :data:`~.registry.ARCHITECTURES`: ``"deqdet"``, ``"adamixer"``, ``"sparse_rcnn"``,
            ``"deq_sparse_rcnn"`` or a registered one.
        backbone, backbone_weights, backbone_norm, frozen_stages: of
            :class:`~.backbone.ResNetBackbone` (`backbone_weights`: a published weights name such as
            ``"IMAGENET1K_V1"``, what the official configs load, or a local state-dict path).
        neck_kernel, neck_relu, gn_groups, neck_init: of :class:`~.neck.ChannelMapper` (DEQDet,
            AdaMixer; the Sparse R-CNN archs use an :class:`~.fpn.FPN` to `dim` channels).
        fpn_norm: the Sparse R-CNN archs' FPN with a ``GroupNorm`` (`gn_groups`) after every convolution;
            off in the published design.
        dim: channels of the features and of the query content.
        num_queries: ``N`` (queries, or Sparse R-CNN's learned proposals).
        query_boxes: where DEQDet's and AdaMixer's queries start (:class:`~.queries.InitialQueries`):
            ``"image"`` (the published design) or ``"grid"`` (one cell of a grid each).
        num_heads, ffn_dim: of every decoder layer.
        num_points, out_points, num_groups: of each :class:`~.adamixer_stage.AdaMixerStage`
            (``P`` = `num_points`).
        dynamic_dim, roi_size, clip_boxes: of each :class:`~.sparse_rcnn_stage.SparseRCNNStage`
            (the dynamic interaction's hidden width, the RoIAlign grid, clipping decoded boxes to the image).
        num_stages: AdaMixer's and Sparse R-CNN's stage count.
        train_steps, test_steps, supervise_steps, init_refinements, rag_steps: the DEQ schedule
            (DEQDet, DEQ Sparse R-CNN).
        stack_branches: the DEQ models refine every branch after ``y_0`` in one stacked graph
            (:class:`~.deqdet.DEQDet`): fewer operator calls, the memory of every branch at once (on in the
            tiny presets, off in the paper ones).
        test_tol, test_solver: DEQDet's early exit at inference (:class:`~.deqdet.DEQDet`; DEQ Sparse R-CNN
            has none); None keeps the fixed `test_steps` applications.
        rap_content_prob, rap_content_scale, rap_box_prob, rap_box_pixels: the DEQ models'
            perturbation (:class:`~.rap.RAP`, :class:`~.rap.SparseRCNNRAP`).
        rap_sort_corners: DEQDet's box noise swaps crossed corners back (default False, as the official
            code); Sparse R-CNN's always does.
        num_select: detections per image at inference.
        nms_iou: class-wise NMS at inference above this IoU; None (the published detectors) for none.
        one_to_many: predictions matched to each target in training (:class:`~implicitkit_det.losses.SetCriterion`);
            1, the published one-to-one set loss.

    Each architecture reads only some fields (its row's ``reads``, the ``*_FIELDS`` sets below), and
    :func:`~.registry.build_model` refuses an override of any other. Values no detector can use (a count
    below 1, an even `neck_kernel`, a `supervise_steps` outside ``1 .. train_steps``, an unknown choice) are
    refused when a config is made, instead of failing, or being read as something else, in training.

    Raises:
        ``ValueError`` naming the field, its value and what to give instead.
    """

    arch: str = "deqdet"
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    backbone_norm: Literal["frozen_stats", "frozen", "batch"] | None = None
    frozen_stages: int | None = None
    neck_kernel: int = 3
    neck_relu: bool = True
    gn_groups: int = 32
    neck_init: Literal["xavier_uniform", "pytorch"] = "xavier_uniform"
    fpn_norm: bool = False
    dim: int = 256
    num_queries: int = 100
    query_boxes: QueryBoxes = "image"
    num_heads: int = 8
    num_points: int = 64
    out_points: int = 128
    num_groups: int = 4
    ffn_dim: int = 2048
    dynamic_dim: int = 64
    roi_size: int = 7
    clip_boxes: bool = False
    num_stages: int = 6
    train_steps: int = 20
    test_steps: int = 21
    supervise_steps: tuple[int, ...] = (1, 3, 6, 9, 12, 20)
    init_refinements: int = 2
    rag_steps: int = 2
    stack_branches: bool = False
    test_tol: float | None = None
    test_solver: Literal["fixed", "anderson"] = "fixed"
    rap_content_prob: float = 0.2
    rap_content_scale: float = 0.1
    rap_box_prob: float = 0.2
    rap_box_pixels: float = 25.0
    rap_sort_corners: bool = False
    num_select: int = 100
    nms_iou: float | None = None
    one_to_many: int = 1

    def __post_init__(self) -> None:
        for name, options in _choices().items():
            if getattr(self, name) not in options:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: choose one of {list(options)}")
        for name, low in _AT_LEAST.items():
            if getattr(self, name) < low:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: give {name} >= {low}")
        if self.neck_kernel % 2 == 0:
            # padding k // 2 grows an even kernel's output by a pixel: off the backbone's stride grid by half
            raise ValueError(
                f"ModelConfig.neck_kernel={self.neck_kernel}: an even kernel makes each neck map one pixel "
                "larger than its backbone level and shifts it by half a pixel; give an odd size (3, or 1 for "
                "AdaMixer's)"
            )
        for name in ("rap_content_prob", "rap_content_scale", "rap_box_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: give a value in [0, 1]")
        if self.rap_box_pixels < 0:
            raise ValueError(
                f"ModelConfig.rap_box_pixels={self.rap_box_pixels!r}: give a size in pixels, >= 0"
            )
        steps = tuple(self.supervise_steps)
        if not steps and self.init_refinements == 0 and self.arch in ("deqdet", "deq_sparse_rcnn"):
            raise ValueError(
                "ModelConfig: supervise_steps=() with init_refinements=0 leaves the refinement layer F out of "
                "every loss, so it stays untrained while inference applies it (test_steps times); supervise a "
                "step, or set init_refinements >= 1"
            )
        if len(set(steps)) < len(steps):
            raise ValueError(
                f"ModelConfig.supervise_steps={steps}: a step given twice is one branch (one name, one "
                f"loss); give each step once, e.g. {tuple(sorted(set(steps)))}"
            )
        check_supervise_steps("ModelConfig", steps, self.train_steps)


#: Fields that are counts: the least value each accepts (0 refinements or test steps are meaningful).
_AT_LEAST = {
    "dim": 1, "num_queries": 1, "num_heads": 1, "num_points": 1, "out_points": 1, "num_groups": 1,
    "ffn_dim": 1, "gn_groups": 1, "neck_kernel": 1, "dynamic_dim": 1, "roi_size": 1, "num_stages": 1,
    "train_steps": 1, "rag_steps": 1, "test_steps": 0, "init_refinements": 0,
}  # fmt: skip


@functools.cache
def _choices() -> dict[str, tuple[Any, ...]]:
    """The fields of fixed choices (``Literal``, possibly optional) and the values each accepts."""
    out = {}
    for name, kind in typing.get_type_hints(ModelConfig).items():
        options = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType):  # Literal[...] | None
            literals = [o for o in options if typing.get_origin(o) is Literal]
            options = (*typing.get_args(literals[0]), None) if literals else ()
        elif typing.get_origin(kind) is not Literal:
            continue
        if options:
            out[name] = options
    return out


DEQDET_R50 = ModelConfig()
ADAMIXER_R50 = ModelConfig(arch="adamixer", neck_kernel=1, neck_relu=False, num_points=32)
SPARSE_RCNN_R50 = ModelConfig(arch="sparse_rcnn")
DEQ_SPARSE_RCNN_R50 = ModelConfig(arch="deq_sparse_rcnn")
# CPU-sized (a training step well under a second on 2 cores at 128-192 px): ResNet-10, 64 channels, 20
# queries, 4 points per group; the DEQ schedule is the paper's. Box noise is scaled like the images
# (25 px at ~800 px is ~4 px at ~150 px). For pretrained weights use backbone="resnet18", backbone_weights="IMAGENET1K_V1".
# The DEQ models stack their branches: at this size a decoder op costs its call, not its arithmetic
# (docs/benchmarks.md: x1.1-1.2 per float32 step of the digits runs; at paper shape stacking is slower on the CPU
# and costs 1.6-2.1x the step's memory, so the paper presets keep one group per branch).
TINY = dict(
    backbone="resnet10",
    dim=64,
    gn_groups=8,
    num_queries=20,
    num_heads=4,
    num_points=4,
    out_points=16,
    ffn_dim=256,
    stack_branches=True,
)
# The tiny Sparse R-CNNs: the backbone and widths of the tiny DEQDet, a 16-wide dynamic interaction.
SPARSE_TINY = dict(
    backbone="resnet10", dim=64, num_queries=20, num_heads=4, ffn_dim=256, dynamic_dim=16, stack_branches=True
)


# --------------------------------------------------------------------------------------------------------
# The builders of the table's rows (:data:`~.registry.ARCHITECTURES`): ``(config, num_classes) -> detector``,
# each with the set of fields it reads (its row's ``reads``; tests/det/test_det_registry.py traces every
# builder and compares). ``arch`` is read by ``build_model`` itself, so every row accepts it.

#: What every builder reads: the backbone, the widths, the queries' count and the outputs.
COMMON_FIELDS = frozenset(
    {"backbone", "backbone_weights", "backbone_norm", "frozen_stages", "dim", "num_queries", "num_heads",
     "ffn_dim", "num_select", "nms_iou", "one_to_many"}
)  # fmt: skip


def make_backbone(cfg: ModelConfig) -> ResNetBackbone:
    """The ResNet a configuration names, with its weights, normalisation and frozen stages."""
    return ResNetBackbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_norm, cfg.frozen_stages)


def _adamixer_parts(
    cfg: ModelConfig, num_classes: int
) -> tuple[ResNetBackbone, ChannelMapper, InitialQueries, Callable[[], AdaMixerStage]]:
    backbone = make_backbone(cfg)
    neck = ChannelMapper(
        backbone.channels, cfg.dim, cfg.neck_kernel, cfg.neck_relu, cfg.gn_groups, init=cfg.neck_init
    )
    queries = InitialQueries(cfg.num_queries, cfg.dim, cfg.query_boxes)

    def layer() -> AdaMixerStage:
        return AdaMixerStage(
            num_classes,
            cfg.dim,
            cfg.num_heads,
            cfg.num_points,
            cfg.out_points,
            cfg.num_groups,
            cfg.ffn_dim,
            backbone.strides,
        )

    return backbone, neck, queries, layer


_ADAMIXER_PARTS = frozenset(
    {"neck_kernel", "neck_relu", "gn_groups", "neck_init", "query_boxes", "num_points", "out_points",
     "num_groups"}
)  # fmt: skip
ADAMIXER_FIELDS = COMMON_FIELDS | _ADAMIXER_PARTS | {"num_stages"}


def build_adamixer(cfg: ModelConfig, num_classes: int) -> AdaMixer:
    """AdaMixer: a channel-mapper neck, learned queries and ``num_stages`` :class:`AdaMixerStage` stages."""
    backbone, neck, queries, layer = _adamixer_parts(cfg, num_classes)
    return AdaMixer(
        backbone,
        neck,
        queries,
        [layer() for _ in range(cfg.num_stages)],
        num_select=cfg.num_select,
        nms_iou=cfg.nms_iou,
        criterion=SetCriterion(one_to_many=cfg.one_to_many),
    )


_RAP = frozenset({"rap_content_prob", "rap_content_scale", "rap_box_prob", "rap_box_pixels"})
_DEQ_SCHEDULE = frozenset(
    {"train_steps", "test_steps", "supervise_steps", "init_refinements", "rag_steps", "stack_branches"}
)
DEQDET_FIELDS = (
    COMMON_FIELDS | _ADAMIXER_PARTS | _RAP | _DEQ_SCHEDULE | {"rap_sort_corners", "test_tol", "test_solver"}
)


def build_deqdet(cfg: ModelConfig, num_classes: int) -> DEQDet:
    """DEQDet: AdaMixer's parts, an init layer ``G`` and a refinement layer ``F``, and RAP."""
    backbone, neck, queries, layer = _adamixer_parts(cfg, num_classes)
    rap = RAP(
        cfg.rap_content_prob,
        cfg.rap_content_scale,
        cfg.rap_box_prob,
        cfg.rap_box_pixels,
        sort_corners=cfg.rap_sort_corners,
    )
    return DEQDet(
        backbone, neck, queries, layer(), layer(), perturbation=rap, test_tol=cfg.test_tol,
        test_solver=cfg.test_solver, **_deq_schedule(cfg),
    )  # fmt: skip


def _sparse_rcnn_parts(
    cfg: ModelConfig, num_classes: int
) -> tuple[ResNetBackbone, FPN, LearnedProposals, Callable[[bool], SparseRCNNStage]]:
    backbone = make_backbone(cfg)
    neck = FPN(backbone.channels, cfg.dim, norm_groups=cfg.gn_groups if cfg.fpn_norm else None)
    proposals = LearnedProposals(cfg.num_queries, cfg.dim)

    def stage(first: bool) -> SparseRCNNStage:
        return SparseRCNNStage(
            num_classes,
            cfg.dim,
            cfg.num_heads,
            cfg.dynamic_dim,
            cfg.roi_size,
            cfg.ffn_dim,
            strides=backbone.strides,
            detach_boxes=not first,
            clip_boxes=cfg.clip_boxes,
        )

    return backbone, neck, proposals, stage


# `gn_groups` only with `fpn_norm`.
_SPARSE_RCNN_PARTS = frozenset({"fpn_norm", "gn_groups", "dynamic_dim", "roi_size", "clip_boxes"})
SPARSE_RCNN_FIELDS = COMMON_FIELDS | _SPARSE_RCNN_PARTS | {"num_stages"}


def build_sparse_rcnn(cfg: ModelConfig, num_classes: int) -> SparseRCNN:
    """Sparse R-CNN: an FPN, learned proposals and ``num_stages`` :class:`SparseRCNNStage` stages."""
    backbone, neck, proposals, stage = _sparse_rcnn_parts(cfg, num_classes)
    stages = [stage(i == 0) for i in range(cfg.num_stages)]
    return SparseRCNN(
        backbone, neck, proposals, stages, num_select=cfg.num_select, nms_iou=cfg.nms_iou,
        criterion=SetCriterion(one_to_many=cfg.one_to_many),
    )  # fmt: skip


# No `test_tol`, `test_solver`: the early exit is DEQDet's; no `rap_sort_corners`: its box noise always sorts.
DEQ_SPARSE_RCNN_FIELDS = COMMON_FIELDS | _SPARSE_RCNN_PARTS | _RAP | _DEQ_SCHEDULE


def build_deq_sparse_rcnn(cfg: ModelConfig, num_classes: int) -> DEQSparseRCNN:
    """DEQ Sparse R-CNN: Sparse R-CNN's parts, a first stage ``G``, a refinement stage ``F``, and RAP."""
    backbone, neck, proposals, stage = _sparse_rcnn_parts(cfg, num_classes)
    rap = SparseRCNNRAP(cfg.rap_content_prob, cfg.rap_content_scale, cfg.rap_box_prob, cfg.rap_box_pixels)
    return DEQSparseRCNN(
        backbone, neck, proposals, stage(True), stage(False), perturbation=rap, **_deq_schedule(cfg)
    )


def _deq_schedule(cfg: ModelConfig) -> dict[str, Any]:
    """What every DEQ detector takes from the config besides its layers: the solve's schedule and outputs."""
    return {
        "train_steps": cfg.train_steps,
        "test_steps": cfg.test_steps,
        "supervise_steps": cfg.supervise_steps,
        "init_refinements": cfg.init_refinements,
        "rag_steps": cfg.rag_steps,
        "stack_branches": cfg.stack_branches,
        "num_select": cfg.num_select,
        "nms_iou": cfg.nms_iou,
        "criterion": SetCriterion(one_to_many=cfg.one_to_many),
    }


# --------------------------------------------------------------------------------------------------------
# ``KEY=VALUE`` overrides from the command line, read by the field's type.
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

#: fields under their earlier names, as saved runs and older commands spell them.
RENAMED_FIELDS = {"stack_rag_branches": "stack_branches"}


def current_field_names(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`overrides` with every field under its current name (:data:`RENAMED_FIELDS`), in the same order.

    Raises:
        ``ValueError`` when a field is given under both names with different values.
    """
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # the key each field was given under
    for key, value in overrides.items():
        name = RENAMED_FIELDS.get(key, key)
        if name in out and out[name] != value:
            raise ValueError(
                f"{spelled[name]}={out[name]!r} and {key}={value!r} set the same field {name!r}: give it once"
            )
        out[name], spelled[name] = value, key
    return out


def parse_model_args(items: Sequence[str]) -> dict[str, Any]:
    """``["neck_relu=False", "supervise_steps=1,2"]`` -> ``{"neck_relu": False, "supervise_steps": (1, 2)}``.

    Each value is read by the type of its :class:`ModelConfig` field: booleans (true/false, 1/0, yes/no),
    integers, floats, strings, tuples of integers (``1,2``, ``[1,2]`` or ``(1,2)``), optional fields
    (``none``) and fixed choices.

    Raises:
        ``ValueError`` naming the option and what it accepts.
    """
    hints = typing.get_type_hints(ModelConfig)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = RENAMED_FIELDS.get(key.strip(), key.strip())
        if not sep or not key:
            raise ValueError(f"--model-arg {item!r} is not KEY=VALUE")
        if key not in hints:
            fields = [f.name for f in dataclasses.fields(ModelConfig)]
            raise ValueError(
                f"--model-arg {item!r}: {key!r} is not a model config field; the fields are {fields}"
            )
        try:
            out[key] = _parse_value(text.strip(), hints[key])
        except ValueError as err:
            raise ValueError(f"--model-arg {item!r}: {err}") from None
    return out


def _parse_value(text: str, kind: Any) -> Any:
    origin, options = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _parse_value(text, option)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(" or ".join(errors) + (", or none" if type(None) in options else ""))
    if origin is Literal:
        if text not in options:
            raise ValueError(f"expects one of {list(options)}, got {text!r}")
        return text
    if origin is tuple:
        inner = text.strip("[]()")
        try:
            return tuple(int(v) for v in inner.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expects integers separated by commas (e.g. 1,3,6), got {text!r}") from None
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"expects true or false, got {text!r}")
    if kind in (int, float):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind is int and value != int(value))
        ):
            raise ValueError(f"expects {'an integer' if kind is int else 'a number'}, got {text!r}")
        return kind(value)
    if kind is str:
        return text
    raise ValueError(f"cannot read a value of type {kind}")
