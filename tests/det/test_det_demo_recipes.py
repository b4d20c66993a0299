"""The demo's command: each detector trains with its own row's recipe, on the shapes every demo shares."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from implicitkit_det import recipes
from implicitkit_det.models import ARCHITECTURES, CONFIGS, DemoRecipe

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deqdet_coco.py"


@pytest.fixture
def demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("deqdet_coco", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen: list[list[str]] = []
    monkeypatch.setattr(module.cli, "main", lambda argv: seen.append(list(argv)) or {"AP": 0.5, "AP50": 0.7})
    monkeypatch.setattr(recipes, "digits_backbone", lambda config=None: "weights.pth")
    return module, seen


def value(argv: list[str], option: str) -> str:
    """The last value given to `option` (later options win, as argparse reads them)."""
    return argv[len(argv) - 1 - argv[::-1].index(option) + 1]


@pytest.mark.parametrize(
    "config", ["deqdet_tiny", "adamixer_tiny", "sparse_rcnn_tiny", "deq_sparse_rcnn_tiny"]
)
def test_each_config_gets_its_rows_recipe(demo, config):
    module, seen = demo
    module.main([] if config == "deqdet_tiny" else ["--config", config])
    (argv,) = seen
    row: DemoRecipe = ARCHITECTURES[CONFIGS[config].arch].demo
    assert value(argv, "--config") == config
    assert float(value(argv, "--lr")) == row.lr and int(value(argv, "--epochs")) == row.epochs
    assert float(value(argv, "--decoder-lr-mult")) == row.decoder_lr_mult
    assert ("--amp" in argv) == row.amp
    assert all(item in argv for item in row.model_args)
    assert value(argv, "--output-dir") == "outputs/" + config.removesuffix("_tiny") + "_digits_demo"
    assert "backbone_weights=weights.pth" in argv and value(argv, "--refinement-curve") == "12"


def test_options_given_win_and_unknown_configs_reach_the_command_lines_check(demo):
    module, seen = demo
    module.main(["--epochs", "2"])
    assert value(seen[-1], "--epochs") == "2"
    assert module.demo_config(["--config", "no_such_model"]) == "deqdet_tiny"
    module.main(["--config", "no_such_model"])
    assert value(seen[-1], "--config") == "no_such_model"  # refused there, with the list of configs


def test_a_dataset_runs_the_command_line_unchanged(demo):
    module, seen = demo
    argv = ["--config", "deqdet_r50_1x", "--data-root", "/data/coco"]
    module.main(argv)
    assert seen[-1] == argv


def test_help_builds_nothing_of_the_demo(demo, monkeypatch):
    """--help built the digits set and pre-trained a backbone (a minute on a first run) before printing."""
    module, seen = demo
    monkeypatch.setattr(recipes, "digits_backbone", lambda config=None: pytest.fail("pre-trained for --help"))
    module.main(["--help"])
    assert seen[-1] == ["--help"]


@pytest.mark.parametrize(
    ("given", "drops"),
    [
        (["--epochs", "9"], "8"),
        (["--epochs", "4"], "3"),
        (["--epochs", "1"], ""),
        (["--epoch", "9"], "8"),  # as argparse reads an abbreviation
        (["--epochs=4", "--epochs", "9"], "8"),  # and a repeat: the last
        (["train", "--epochs", "9"], "8"),
    ],
)
def test_more_or_fewer_epochs_keep_the_drop_before_the_last(demo, given, drops):
    # The recipe's --lr-drops 7 stayed: --epochs 4 was refused over an option never typed.
    module, seen = demo
    module.main(given)
    argv = seen[-1]
    assert argv[0] == given[0] if given[0] == "train" else argv[0] == "--config"
    assert value(argv, "--lr-drops") == drops


def test_another_backbone_trains_from_scratch(demo):
    """The pre-trained ResNet-10 was handed to any backbone: a resnet18 run failed after pre-training."""
    module, seen = demo
    for given in (["--model-arg", "backbone=resnet18"], ["--model-arg=backbone=resnet18"]):
        module.main(given)
        assert not any(word.startswith("backbone_weights=") for word in seen[-1])
    module.main(["--config", "deqdet_r50_1x"])
    assert not any(word.startswith("backbone_weights=") for word in seen[-1])


@pytest.mark.parametrize("config", [name for name in CONFIGS if name.endswith("_tiny")])
def test_each_recipe_passes_only_options_its_detector_reads(config):
    """The shared DEQ schedule is DEQDet's and DEQ Sparse R-CNN's: AdaMixer and Sparse R-CNN get none of it."""
    from implicitkit_det.models.registry import unread_overrides

    argv = recipes.digits_recipe(config, pretrained=False)
    given = dict(argv[i + 1].split("=", 1) for i, word in enumerate(argv) if word == "--model-arg")
    assert "num_queries" in given and unread_overrides(config, given) == []
    assert ("train_steps" in given) == (ARCHITECTURES[CONFIGS[config].arch].deq)
