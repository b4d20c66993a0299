"""The detector table: a detector registered from outside the package trains through the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from det_tied_adamixer import TIED_ADAMIXER, TiedAdaMixer, register

from implicitkit_det import cli
from implicitkit_det.engine import recipe_for
from implicitkit_det.models import ARCHITECTURES, CONFIGS, RECIPES, build_model, register_detector
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
