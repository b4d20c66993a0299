"""The detector table: a detector registered from outside the package trains through the command line."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from det_tied_adamixer import TIED_ADAMIXER, TiedAdaMixer, register

from implicitkit_det import cli
from implicitkit_det.engine import recipe_for
from implicitkit_det.models import (
    ARCHITECTURES,
    CONFIGS,
    RECIPES,
    ChannelMapper,
    ModelConfig,
    build_model,
    register_detector,
)
from implicitkit_det.models.configs import parse_model_args
from implicitkit_det.models.registry import unread_overrides
from implicitkit_det.recipes import digits_recipe

FAST = [
    "--config", "tied_adamixer_tiny", "--image-size", "64", "--max-size", "96", "--workers", "0",
    "--batch-size", "2", "--epochs", "1", "--max-iters", "1", "--warmup-iters", "1", "--print-freq", "1",
    "--model-arg", "num_queries=8",
]  # fmt: skip


@pytest.fixture
def tied_adamixer():
    register()
    try:
        yield
    finally:
        del ARCHITECTURES["tied_adamixer"]


def test_registered_detector_trains_one_iteration_through_the_command_line(
    tied_adamixer, tiny_digits, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = [*FAST, "--data-root", str(tiny_digits.root), "--output-dir", str(out), "--refinement-curve", "4"]
    stats = cli.main(argv)
    assert 0.0 <= stats["AP"] <= 1.0
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["train"]["iters"] == 1 and {"step0_loss", "step2_loss"} <= set(record["train"])
    # The row's optimiser recipe is the run's default.
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["weight_decay"], args["decoder_lr_mult"], args["decoder_wd_mult"]) == (1e-4, 1.0, 1.0)
    # The refinement curve runs through the detector's own refinement layers, its depth marked.
    curve = json.loads((out / "refinement_curve.json").read_text())
    assert curve["train_depth"] == 2 and [p["steps"] for p in curve["curve"]] == [0, 1, 2, 3, 4]
    # The checkpoint holds the trained model, and that model is the registered builder's.
    state = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=False)["model"]
    model = build_model("tied_adamixer_tiny", 10, num_queries=8)
    assert isinstance(model, TiedAdaMixer) and set(state) == set(model.state_dict())
    # Not a DEQ: the row says test-time steps cannot change.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--deq-steps", "3"])
    assert (
        "--deq-steps: tied_adamixer_tiny (tied_adamixer) has no test-time step count"
        in capsys.readouterr().err
    )


def test_the_table_is_the_one_source(tied_adamixer):
    assert (
        CONFIGS["tied_adamixer_tiny"].arch == "tied_adamixer"
        and RECIPES["tied_adamixer"] == TIED_ADAMIXER.recipe
    )
    assert recipe_for("tied_adamixer") is TIED_ADAMIXER.recipe
    demo = digits_recipe("tied_adamixer_tiny", pretrained=False)
    assert demo[demo.index("--lr") :] == [  # the row's DemoRecipe, after the shapes every demo shares
        "--lr", "0.0006", "--decoder-lr-mult", "1", "--decoder-wd-mult", "1", "--epochs", "5", "--lr-drops", "4",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="'tied_adamixer' is registered already"):
        register()
    other = dataclasses.replace(TIED_ADAMIXER, configs={"x_tiny": CONFIGS["deqdet_tiny"]})
    with pytest.raises(ValueError, match="has arch='deqdet'; set arch='x'"):
        register_detector("x", other)
    taken = dataclasses.replace(TIED_ADAMIXER, configs={"deqdet_tiny": CONFIGS["deqdet_tiny"]})
    with pytest.raises(ValueError, match="'deqdet_tiny' is taken"):
        register_detector("y", taken)
    assert "x" not in ARCHITECTURES and "y" not in ARCHITECTURES


def test_unknown_arch_names_the_table():
    with pytest.raises(ValueError, match="unknown arch 'nope'; choose one of"):
        build_model("deqdet_tiny", 3, arch="nope")
    assert "tied_adamixer_tiny" not in CONFIGS


# --------------------------------------------------------------------------------------------------------
# Overrides a builder never reads, and values no detector can use, are refused when the model is built.
class _RecordingConfig:
    """A ModelConfig that records every field a builder reads from it."""

    def __init__(self, config: ModelConfig) -> None:
        self._config, self.read = config, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self._config, name)


SHIPPED = ["deqdet", "adamixer", "sparse_rcnn", "deq_sparse_rcnn"]


@pytest.mark.parametrize("arch", SHIPPED)
def test_each_row_lists_exactly_the_fields_its_builder_reads(arch):
    # Traced over the row's configurations, each also with its demo's options (fpn_norm=true reads gn_groups).
    row, read = ARCHITECTURES[arch], set()
    demo = parse_model_args(row.demo.model_args)
    for config in row.configs.values():
        for variant in (config, dataclasses.replace(config, **demo)):
            recorder = _RecordingConfig(variant)
            with torch.device("meta"):
                row.build(recorder, 3)
            read |= recorder.read
    assert read == row.reads


SPARSE_READ, DEQ_READ = "(read by deq_sparse_rcnn, sparse_rcnn)", "(read by deq_sparse_rcnn, deqdet)"


@pytest.mark.parametrize(
    "config, overrides, expected",
    [
        ("sparse_rcnn_tiny", {"query_boxes": "grid"}, "sparse_rcnn_tiny (sparse_rcnn) does not read "
         "query_boxes='grid' (read by adamixer, deqdet): its builder would ignore it; drop it"),
        ("deq_sparse_rcnn_tiny", {"query_boxes": "grid"}, "(deq_sparse_rcnn) does not read query_boxes='grid'"),
        ("adamixer_tiny", {"train_steps": 3, "supervise_steps": (1,)},
         f"adamixer_tiny (adamixer) does not read train_steps=3 {DEQ_READ}, supervise_steps=(1,) {DEQ_READ}"),
        ("adamixer_tiny", {"test_steps": 2}, f"does not read test_steps=2 {DEQ_READ}"),
        ("adamixer_tiny", {"rap_content_prob": 1.0}, f"does not read rap_content_prob=1.0 {DEQ_READ}"),
        ("deqdet_tiny", {"num_stages": 2}, "(deqdet) does not read num_stages=2 (read by adamixer, sparse_rcnn)"),
        ("deqdet_tiny", {"clip_boxes": True}, f"does not read clip_boxes=True {SPARSE_READ}"),
        ("deqdet_tiny", {"fpn_norm": True}, f"does not read fpn_norm=True {SPARSE_READ}"),
        ("deqdet_tiny", {"arch": "adamixer", "rag_steps": 3}, "deqdet_tiny (adamixer) does not read rag_steps=3"),
    ],
)  # fmt: skip
def test_build_model_refuses_an_override_the_architecture_does_not_read(config, overrides, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_model(config, 3, **overrides)
    assert unread_overrides(config, overrides) == [name for name in overrides if name != "arch"]


@pytest.mark.parametrize("arch", SHIPPED)
def test_the_rows_demo_options_and_the_fields_every_row_reads_are_accepted(arch):
    config = f"{arch}_tiny"
    overrides = parse_model_args(ARCHITECTURES[arch].demo.model_args)
    overrides |= {"backbone": "resnet18", "dim": 32, "num_queries": 5, "num_select": 5, "one_to_many": 2}
    assert unread_overrides(config, overrides) == []
    with torch.device("meta"):
        build_model(config, 3, **overrides)


def test_a_row_that_does_not_list_its_fields_accepts_every_override(tied_adamixer):
    assert ARCHITECTURES["tied_adamixer"].reads is None
    with torch.device("meta"):
        build_model("tied_adamixer_tiny", 3, train_steps=2, supervise_steps=(1,))
    assert unread_overrides("tied_adamixer_tiny", {"train_steps": 2}) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_queries": 0}, "ModelConfig.num_queries=0: give num_queries >= 1"),
        ({"init_refinements": -1}, "ModelConfig.init_refinements=-1: give init_refinements >= 0"),
        ({"supervise_steps": (3, 3)}, "supervise_steps=(3, 3): a step given twice is one branch"),
        (
            {"train_steps": 3},
            "supervise_steps=(1, 3, 6, 9, 12, 20): [6, 9, 12, 20] outside 1 .. train_steps=3",
        ),
        ({"supervise_steps": (0, 2)}, "[0] outside 1 .. train_steps=20"),
        (
            {"test_solver": "broyden"},
            "ModelConfig.test_solver='broyden': choose one of ['fixed', 'anderson']",
        ),
        (
            {"neck_kernel": 2},
            "ModelConfig.neck_kernel=2: an even kernel makes each neck map one pixel larger",
        ),
        ({"test_steps": -1}, "ModelConfig.test_steps=-1: give test_steps >= 0"),
    ],
)
def test_values_no_detector_can_use_are_refused_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model("deqdet_tiny", 3, **overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**overrides)


def test_the_values_that_look_odd_but_work_are_kept():
    # No RAG branch at all (the init branches train alone), steps in any order, a 1x1 neck (AdaMixer's).
    for overrides in ({"supervise_steps": ()}, {"supervise_steps": (6, 3)}, {"neck_kernel": 1}):
        with torch.device("meta"):
            build_model("deqdet_tiny", 3, **overrides)
    # Why an even neck kernel is refused: with padding k // 2 its map is a pixel larger than the level.
    level = torch.zeros(1, 8, 16, 16)
    assert ChannelMapper([8], 8, 2, num_groups=4)([level])[0].shape[-1] == 17


def test_deq_sparse_rcnn_refuses_an_early_exit_tolerance_on_every_path():
    torch.manual_seed(0)
    model = build_model("deq_sparse_rcnn_tiny", 3, num_queries=4, test_steps=2).eval()
    for set_it in (lambda: model.configure_test(test_tol=1e-3), lambda: setattr(model, "test_tol", 1e-3)):
        with pytest.raises(ValueError, match=r"DEQ Sparse R-CNN has no early exit .*DEQDet's only"):
            set_it()
    with pytest.raises(ValueError, match=r"does not read test_tol=0.001 \(read by deqdet\)"):
        build_model("deq_sparse_rcnn_tiny", 3, test_tol=1e-3)
    for set_it in (
        lambda: model.configure_test(test_solver="anderson"),
        lambda: setattr(model, "test_solver", "anderson"),
    ):
        with pytest.raises(ValueError, match=r"test_solver='anderson': DEQ Sparse R-CNN has no early exit"):
            set_it()
    model.configure_test(test_tol=None, test_solver="fixed", test_steps=3)  # the fixed count is what it has
    with torch.no_grad():
        (detections,) = model(torch.randn(1, 3, 64, 64))
    assert model.test_tol is None and model.last_steps.tolist() == [3] and len(detections["boxes"]) > 0


def test_an_unread_option_equal_to_the_configs_own_value_changes_nothing_and_is_accepted():
    """Generic code passes one set of options to every detector: test_tol=None is DEQ Sparse R-CNN's value."""
    from implicitkit_det.models.registry import read_overrides

    with torch.device("meta"):
        build_model("deq_sparse_rcnn_tiny", 10, test_tol=None)
        build_model("sparse_rcnn_tiny", 10, query_boxes="image")
        build_model("adamixer_tiny", 10, supervise_steps=[1, 3, 6, 9, 12, 20])  # a list for the tuple default
    # A saved run's old field name is read under its current one, and dropped when unread.
    kept, dropped = read_overrides("adamixer_tiny", {"stack_rag_branches": False, "num_queries": 10})
    assert kept == {"num_queries": 10} and dropped == ["stack_branches"]


def test_gn_groups_is_read_by_the_sparse_rcnns_only_with_their_fpn_norm():
    """Without fpn_norm the FPN has no GroupNorm: gn_groups was accepted and did nothing."""
    with pytest.raises(
        ValueError, match=r"does not read gn_groups=16 \(read by .*sparse_rcnn with fpn_norm=true"
    ):
        build_model("sparse_rcnn_tiny", 10, gn_groups=16)
    model = build_model("sparse_rcnn_tiny", 10, gn_groups=16, fpn_norm=True)
    assert {m.num_groups for m in model.neck.modules() if isinstance(m, torch.nn.GroupNorm)} == {16}


def test_a_checkpoints_options_rebuild_a_pretrained_backbones_layout_without_its_file():
    """The record kept the weights path only: rebuilt from its options without the (machine-local) file, a
    pre-trained backbone took the from-scratch defaults (trained batch norm, no frozen stage: 83,520 more
    trainable parameters in deqdet_tiny) while its state dict still loaded, key for key."""
    from implicitkit_det.models.backbone import PRETRAINED_FROZEN_STAGES, PRETRAINED_NORM
    from implicitkit_det.models.registry import with_backbone_layout, without_weight_files

    saved = with_backbone_layout("deqdet_tiny", {"backbone_weights": "/elsewhere/resnet10.pth"})
    assert saved["backbone_norm"] == PRETRAINED_NORM and saved["frozen_stages"] == PRETRAINED_FROZEN_STAGES
    assert saved["backbone_weights"] == "/elsewhere/resnet10.pth"
    by_hand = build_model("deqdet_tiny", 3, **{k: v for k, v in saved.items() if k != "backbone_weights"})
    by_loader = build_model("deqdet_tiny", 3, **without_weight_files("deqdet_tiny", saved))
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (by_hand, by_loader)]
    assert trainable[0] == trainable[1]
    assert by_hand.backbone.norm == PRETRAINED_NORM
    # Without weights nothing is written out: a from-scratch run keeps its own defaults.
    assert with_backbone_layout("deqdet_tiny", {"num_queries": 4}) == {"num_queries": 4}
