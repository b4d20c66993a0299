"""The Sparse R-CNNs through the command line, with their own optimiser recipe; the recipes and the 3x schedule."""

from __future__ import annotations

import json

import pytest

from implicitkit_det import cli
from implicitkit_det.engine import RECIPES, SCHEDULES, build_run_config, recipe_for

SIZES = ["--image-size", "64", "--max-size", "96", "--workers", "0", "--batch-size", "2"]
FAST = [*SIZES, "--max-iters", "2", "--warmup-iters", "2", "--print-freq", "1", "--epochs", "1"]
DEQ = ["--deq-steps", "2", "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=[1,2]"]


@pytest.mark.parametrize(
    "config, extra, first_branch",
    [("sparse_rcnn_tiny", [], "stage0_loss"), ("deq_sparse_rcnn_tiny", DEQ, "init_loss")],
)
def test_sparse_rcnn_trains_and_evaluates_through_the_cli(
    tiny_digits, tmp_path, capsys, config, extra, first_branch
):
    out = tmp_path / config
    argv = [
        "--config",
        config,
        *FAST,
        *extra,
        "--model-arg",
        "num_queries=8",
        "--data-root",
        str(tiny_digits.root),
    ]
    stats = cli.main([*argv, "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert config in printed and "Average Precision" in printed
    # Sparse R-CNN's recipe: weight decay 1e-4 and no decoder multipliers.
    assert "base lr 2.5e-05 wd 0.0001, decoder lr 2.5e-05 wd 0.0001" in printed
    assert 0.0 <= stats["AP"] <= 1.0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["train"]["iters"] == 2 and first_branch in record["train"]
    args = json.loads((out / "config.json").read_text())["args"]
    assert (args["weight_decay"], args["decoder_lr_mult"], args["clip_max_norm"]) == (1e-4, 1.0, 1.0)


def test_recipes_per_arch_and_explicit_options_win():
    assert (recipe_for("deqdet").weight_decay, recipe_for("deqdet").decoder_lr_mult) == (0.01, 4.0)
    for arch in ("sparse_rcnn", "deq_sparse_rcnn"):
        r = recipe_for(arch)
        assert (r.lr, r.weight_decay, r.decoder_lr_mult, r.decoder_wd_mult, r.clip_max_norm) == (
            2.5e-5,
            1e-4,
            1.0,
            1.0,
            1.0,
        )
    assert set(RECIPES) == {"deqdet", "adamixer", "sparse_rcnn", "deq_sparse_rcnn"}
    with pytest.raises(KeyError, match="no optimiser recipe for arch 'nope'"):
        recipe_for("nope")
    argv = ["--config", "sparse_rcnn_tiny", "--weight-decay", "0.05"]
    args = cli.build_parser().parse_args(argv)
    cfg = build_run_config(vars(args), cli.given_options(cli.build_parser(), argv))
    assert (cfg.weight_decay, cfg.lr, cfg.decoder_wd_mult) == (0.05, 2.5e-5, 1.0)
    three = SCHEDULES["3x"]
    assert (three.epochs, three.drops) == (36, (27, 33))
