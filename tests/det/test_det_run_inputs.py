"""Bad input is refused before training starts, with a message that names the file or option and the fix;
typed ``--model-arg`` values; what ``--resume`` changes, refuses and restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_coco

from implicitkit_det import cli
from implicitkit_det.engine.run_config import RunConfigError, build_run_config
from implicitkit_det.engine.run_setup import build_run_model
from implicitkit_det.models.configs import parse_model_args

TINY = [
    "--config", "deqdet_tiny", "--image-size", "64", "--max-size", "96", "--batch-size", "2", "--epochs", "1",
    "--warmup-iters", "1", "--workers", "0", "--max-iters", "1", "--print-freq", "0",
    "--model-arg", "train_steps=1", "--model-arg", "supervise_steps=1", "--model-arg", "num_queries=4",
]  # fmt: skip


def _coco(root: Path, **kwargs) -> list[str]:
    images, ann = write_coco(root, **kwargs)
    return [
        "--train-images",
        str(images),
        "--train-ann",
        str(ann),
        "--val-images",
        str(images),
        "--val-ann",
        str(ann),
    ]


def _edit(ann_file: Path, change) -> None:
    data = json.loads(ann_file.read_text())
    change(data)
    ann_file.write_text(json.dumps(data))


def _missing_image(root: Path) -> list[str]:
    argv = _coco(root)
    (root / "images" / "0002.png").unlink()
    return argv


def _truncated_image(root: Path) -> list[str]:
    argv = _coco(root)
    path = root / "images" / "0001.png"
    path.write_bytes(path.read_bytes()[:60])
    return argv


def _wrong_size(root: Path) -> list[str]:
    argv = _coco(root)
    _edit(root / "instances.json", lambda d: d["images"][0].update(width=90))
    return argv


def _separate_val(root: Path, change) -> list[str]:
    argv = _coco(root)
    val = root / "val.json"
    val.write_text((root / "instances.json").read_text())
    _edit(val, change)
    return [*argv[:-1], str(val)]


def _empty_train(root: Path) -> list[str]:
    argv = _coco(root)
    train = root / "train.json"
    train.write_text((root / "instances.json").read_text())
    _edit(train, lambda d: d.update(images=[], annotations=[]))
    return [argv[0], argv[1], "--train-ann", str(train), *argv[4:]]


CASES = {
    "missing image": (_missing_image, "0002.png: missing"),
    "corrupt image": (_truncated_image, "0001.png: cannot be decoded"),
    "size differs": (_wrong_size, "0001.png: is 80x60 pixels, the annotation file says 90x60"),
    "empty val file": (
        lambda r: _separate_val(r, lambda d: d.update(images=[], annotations=[])),
        "val.json lists no images: there is nothing to evaluate on. Point --val-ann",
    ),
    "no categories": (
        lambda r: _separate_val(r, lambda d: d.update(categories=[], annotations=[])),
        "val.json lists no categories",
    ),
    "val file without boxes": (
        lambda r: _separate_val(r, lambda d: d.update(annotations=[])),
        "val.json has no usable box (crowd regions aside) on any of its 3 images, so every AP would be",
    ),
    "two categories with one name": (
        lambda r: _coco(
            r, categories=[{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 12, "name": "cat"}]
        ),
        "categories 3 and 12 are both named 'cat'; names must be unique",
    ),
    "no detections kept": (
        lambda r: [*_coco(r), "--model-arg", "num_select=0"],
        "num_select (detections kept per image) must be an integer >= 1, got 0",
    ),
    "empty train file": (_empty_train, "train.json: it lists no images (point --train-ann"),
    "no boxes to train on": (
        lambda r: _coco(r, annotations=[]),
        "its 3 images have no usable box, so none is left to train on",
    ),
    "bool model arg": (
        lambda r: [*_coco(r), "--model-arg", "neck_relu=maybe"],
        "'neck_relu=maybe': expects true or false",
    ),
    "int model arg": (
        lambda r: [*_coco(r), "--model-arg", "num_queries=abc"],
        "'num_queries=abc': expects an integer",
    ),
    "tuple model arg": (
        lambda r: [*_coco(r), "--model-arg", "supervise_steps=a,b"],
        "'supervise_steps=a,b': expects integers separated by commas",
    ),
    "choice model arg": (
        lambda r: [*_coco(r), "--model-arg", "test_solver=newton"],
        "expects one of ['fixed', 'anderson']",
    ),
    "image size not below max size": (
        lambda r: [*_coco(r), "--image-size", "96", "--max-size", "96"],
        "--image-size 96 must be smaller than --max-size 96",
    ),
    "amp decoder without amp": (
        lambda r: [*_coco(r), "--amp-decoder"],
        "--amp-decoder widens --amp to the decoder: give --amp too",
    ),
    # Values that would turn the optimisation around (gradient ascent, flipped gradients, growing weights).
    "negative decoder lr multiplier": (
        lambda r: [*_coco(r), "--decoder-lr-mult", "-4"],
        "--decoder-lr-mult must be a finite number > 0, got -4.0",
    ),
    "negative weight decay": (
        lambda r: [*_coco(r), "--weight-decay", "-0.5"],
        "--weight-decay must be a finite number >= 0, got -0.5",
    ),
    "clipping norm NaN": (
        lambda r: [*_coco(r), "--clip-max-norm", "nan"],
        "--clip-max-norm must be a finite number >= 0, got nan",
    ),
    "negative refinement curve": (
        lambda r: [*_coco(r), "--refinement-curve", "-1"],
        "--refinement-curve must be at least 0, got -1",
    ),
    "deq steps on a non-DEQ model": (
        lambda r: [*_coco(r), "--config", "adamixer_tiny", "--deq-steps", "3"],
        "--deq-steps: adamixer_tiny (adamixer) has no test-time step count",
    ),
    # Without a tolerance DEQDet applies F a fixed number of times: Anderson would silently not run.
    "a solver without a tolerance": (
        lambda r: [*_coco(r), "--deq-solver", "anderson"],
        "--deq-solver anderson: the solver runs only with an early exit; give --deq-tol too",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_training(case, tmp_path, capsys):
    make, message = CASES[case]
    argv = make(tmp_path / "data")
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, *argv, "--output-dir", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert message in err, err
    assert "training\n" not in out and "epoch 0" not in out  # nothing trained
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_model_args_are_read_by_the_field_types():
    parsed = parse_model_args(
        ["neck_relu=False", "supervise_steps=1,2", "rap_sort_corners=true", "num_queries=8", "test_tol=none",
         "frozen_stages=2", "rap_box_pixels=4", "backbone_norm=frozen"]
    )  # fmt: skip
    assert parsed == {
        "neck_relu": False, "supervise_steps": (1, 2), "rap_sort_corners": True, "num_queries": 8,
        "test_tol": None, "frozen_stages": 2, "rap_box_pixels": 4.0, "backbone_norm": "frozen",
    }  # fmt: skip
    assert parse_model_args(["supervise_steps=[1,3,6]"]) == {"supervise_steps": (1, 3, 6)}
    assert parse_model_args(["test_tol=1e-3"]) == {"test_tol": 1e-3}


def test_resume_restores_the_run_applies_changes_and_refuses_others(tiny_digits, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main([*TINY, "--data-root", str(tiny_digits.root), "--output-dir", str(out), "--skip-image-check"])
    capsys.readouterr()

    with pytest.raises(SystemExit):
        cli.main(["--resume", str(out), "--batch-size", "4"])
    assert (
        "--batch-size 4 differs from the run being resumed (2); a resumed run keeps it"
        in capsys.readouterr().err
    )

    # More epochs and a new learning rate: applied (and said), the rest from the checkpoint. The leftover
    # of a checkpoint write cut short is removed.
    stale = out / ".checkpoint_last.pth.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    cli.main(["--resume", str(out), "--epochs", "2", "--lr", "1e-4"])
    printed = capsys.readouterr().out
    assert f"removed {stale}" in printed and not stale.exists()
    assert "changed on resume  epochs 1 -> 2, lr 2.5e-05 -> 0.0001" in printed
    assert "shorter side 64, longer side at most 96" in printed and f"output             {out}" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[1]["train"]["lr"] == pytest.approx(1e-4)  # warm-up over: the new rate in force
    assert json.loads((out / "config.json").read_text())["args"]["lr"] == 1e-4

    # Evaluating the run folder: the input size and data from the checkpoint, the steps used recorded.
    stats = cli.main(
        [
            "eval",
            "--resume",
            str(out),
            "--deq-steps",
            "3",
            "--eval-batch-size",
            "5",
            "--output-dir",
            str(tmp_path / "e"),
        ]
    )
    printed = capsys.readouterr().out
    assert "evaluation only" in printed and "shorter side 64" in printed and "test steps  3" in printed
    assert stats["test_steps"] == 3 and stats["images"] == 5


def _resolve(argv: list[str], checkpoint: dict | None = None):
    parser = cli.build_parser()
    return build_run_config(vars(parser.parse_args(argv)), cli.given_options(parser, argv), checkpoint)


def test_test_time_settings_have_one_path_into_the_model(tmp_path):
    # --model-arg test_steps= is --deq-steps: the same option, the same path (configure_test) into the model.
    spelt_as_model_args = _resolve(["--model-arg", "test_steps=4", "--model-arg", "test_tol=0.5"])
    assert (spelt_as_model_args.deq_steps, spelt_as_model_args.deq_tol) == (4, 0.5)
    assert "test_steps" not in spelt_as_model_args.overrides
    assert spelt_as_model_args == _resolve(["--deq-steps", "4", "--deq-tol", "0.5"])
    model = build_run_model(spelt_as_model_args, num_classes=10, device=torch.device("cpu"))
    assert (model.test_steps, model.test_tol) == (4, 0.5)

    with pytest.raises(RunConfigError, match="--model-arg test_steps=4 and --deq-steps 5 set the same thing"):
        _resolve(["--deq-steps", "5", "--model-arg", "test_steps=4"])
    # A stack of stages has no test-time steps: the shared demo recipe's test_steps stays an unused override.
    stack = _resolve(["--config", "adamixer_tiny", "--model-arg", "test_steps=4"])
    assert stack.deq_steps is None and stack.overrides["test_steps"] == 4

    # On resume it is a test-time setting like --deq-steps: changeable, said as a change.
    checkpoint = {"args": _resolve(["--deq-steps", "2"]).to_dict()}
    resumed = _resolve(["--resume", str(tmp_path), "--eval-only", "--model-arg", "test_steps=3"], checkpoint)
    assert resumed.deq_steps == 3 and resumed.changed == {"deq_steps": (2, 3)}


def test_the_parser_is_built_from_the_run_settings():
    # One default and one help text per setting: RunConfig's field. Every option-carrying field is an option
    # with that help; options that RunConfig leaves to build_run_config (resolved) default to None.
    import dataclasses

    from implicitkit_det.engine.run_settings import RunConfig, option_flag

    actions = {a.dest: a for a in cli.build_parser()._actions}
    for f in dataclasses.fields(RunConfig):
        if "help" not in f.metadata:
            continue
        dest = option_flag(f.name).lstrip("-").replace("-", "_")
        assert actions[dest].help == f.metadata["help"], f.name
        if f.metadata["resolved"]:
            assert actions[dest].default is None, f.name
        elif f.metadata.get("action") != "append":
            assert actions[dest].default == f.default, f.name
    assert _resolve([]).digits_train == RunConfig().digits_train == 1000
