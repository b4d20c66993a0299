"""The command line end to end on a tiny digits set, resuming, evaluating a checkpoint, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from implicitkit_det import cli
from implicitkit_det.models import build_model

# A DEQDet small enough for a few seconds per run: 64-pixel images, a short solver path.
SIZES = ["--image-size", "64", "--max-size", "96", "--workers", "0"]
FAST = [
    "--config", "deqdet_tiny", *SIZES, "--batch-size", "2",
    "--max-iters", "2", "--warmup-iters", "2", "--print-freq", "1", "--deq-steps", "2",
    "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=[1,2]", "--model-arg", "num_queries=8",
]  # fmt: skip


def data_args(files) -> list[str]:
    return ["--data-root", str(files.root)]


def test_train_resume_and_evaluate(tiny_digits, tmp_path, capsys):
    out = tmp_path / "run"
    stats = cli.main([*FAST, *data_args(tiny_digits), "--epochs", "1", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "training" in printed and "deqdet_tiny" in printed and "Average Precision" in printed
    assert 0.0 <= stats["AP"] <= 1.0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["epoch"] == 0
    assert lines[0]["train"]["iters"] == 2 and "init_loss" in lines[0]["train"]
    assert set(lines[0]["eval"]) >= {"AP", "AP50", "AR100", "per_class_AP"}
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "deqdet_tiny" and config["model"]["num_classes"] == 10

    # Resume for a second epoch (under bf16 autocast): picks up at epoch 1 with the checkpoint's config.
    ckpt = out / "checkpoint_last.pth"
    resume = ["--epochs", "2", "--output-dir", str(out), "--resume", str(ckpt), "--amp"]
    cli.main([*FAST[2:], *data_args(tiny_digits), *resume])
    assert "(epoch 0, iteration 2/2)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]

    # Evaluate the checkpoint alone.
    stats = cli.main(
        ["--eval-only", "--resume", str(ckpt), *data_args(tiny_digits), *SIZES,
         "--output-dir", str(tmp_path / "eval"), "--deq-steps", "3"]
    )  # fmt: skip
    assert "evaluation only" in capsys.readouterr().out and 0.0 <= stats["AP"] <= 1.0
    assert json.loads((tmp_path / "eval" / "metrics.jsonl").read_text())["epoch"] == 1


def test_eval_only_scores_every_val_image_and_refuses_renamed_classes(tiny_digits, tmp_path, capsys):
    run = tmp_path / "run"
    cli.main([*FAST, *data_args(tiny_digits), "--epochs", "1", "--output-dir", str(run)])  # --max-iters 2
    evaluate = ["eval", "--resume", str(run), *SIZES, "--output-dir", str(tmp_path / "eval")]
    stats = cli.main([*evaluate, *data_args(tiny_digits)])
    assert stats["images"] == 5  # the training run's cap of 2 batches is not the evaluation's
    renamed = json.loads(tiny_digits.annotations("val").read_text())
    for category in renamed["categories"]:
        category["name"] = f"digit {category['name']}"
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    (tmp_path / "no-images").mkdir()  # refused before the images are read: none need to exist
    other_names = ["--val-ann", str(tmp_path / "renamed.json"), "--val-images", str(tmp_path / "no-images")]
    with pytest.raises(SystemExit) as info:
        cli.main([*evaluate, *other_names])
    assert info.value.code == 2
    assert "was trained on the classes ['0', '1'" in capsys.readouterr().err


def _steps(folder) -> list[tuple[int, float]]:
    return [(r["epoch"], r["lr"]) for r in map(json.loads, (folder / "steps.jsonl").read_text().splitlines())]


def test_an_epoch_end_checkpoint_resumes_on_another_number_of_processes(tiny_digits, tmp_path, capsys):
    """The lr drops stay on their epochs when an epoch splits into other iterations (another world size)."""
    whole = tmp_path / "whole"
    schedule = ["--epochs", "3", "--lr-drops", "2", "--eval-every", "3", "--log-steps"]
    cli.main([*FAST, *data_args(tiny_digits), *schedule, "--keep-every", "1", "--output-dir", str(whole)])
    # Epoch 0's checkpoint as two processes would have written it: one iteration an epoch each.
    ckpt = torch.load(whole / "checkpoint_epoch0.pth", map_location="cpu", weights_only=True)
    ckpt["progress"].update(iteration=1, iters_per_epoch=1, world_size=2)
    ckpt["rng"] = [ckpt["rng"][0]] * 2  # one random state per process
    ckpt["scheduler"]["last_epoch"] = 1
    for lam in ckpt["scheduler"]["lr_lambdas"]:
        lam["iters_per_epoch"] = 1
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    torch.save(ckpt, resumed / "checkpoint_last.pth")
    capsys.readouterr()
    cli.main([*FAST[2:], *data_args(tiny_digits), *schedule, "--resume", str(resumed)])
    assert _steps(resumed) == [step for step in _steps(whole) if step[0] > 0]
    # It trains epoch 1 next, and says so (it named the epoch saved, 0).
    assert "re-seeded for the next epoch, 1" in capsys.readouterr().out


def test_the_resume_hint_names_the_launch_that_ran():
    assert cli.launcher_for(1, 1) == "python"
    assert cli.launcher_for(4, 4) == "torchrun --nproc-per-node=4"
    # Two nodes of four: not --nproc-per-node=8 (eight processes on one node).
    assert cli.launcher_for(8, 4) == "torchrun --nnodes=2 --nproc-per-node=4 [rendezvous options]"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "nope"], "unknown --config 'nope'; choose one of"),
        (["--data-root", "/does/not/exist"], "--data-root /does/not/exist is not a folder"),
        (["--train-ann", "/no/train.json"], "no --train-images"),
        (
            ["--eval-only"],
            "--eval-only evaluates a trained model: pass its run folder or checkpoint with --resume",
        ),
        (["--resume", "/no/ckpt.pth"], "checkpoint /no/ckpt.pth does not exist"),
        (["--resume", "/"], "/ holds no checkpoint_last.pth"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--model-arg", "novalue"], "not KEY=VALUE"),
        (
            ["--model-arg", "num_querys=5"],
            "--model-arg 'num_querys=5': 'num_querys' is not a model config field; the fields are",
        ),
        (["--lr-drops", "8,x"], "give epochs separated by commas"),
        (["--epochs", "12", "--lr-drops", "11,8"], "drops must be increasing"),
    ],
)
def test_bad_input_is_named(argv, message, capsys, tmp_path):
    with pytest.raises((SystemExit, FileNotFoundError)) as info:
        cli.main([*argv, "--output-dir", str(tmp_path)])
    text = capsys.readouterr().err + str(info.value)
    assert message in text


def test_missing_files_under_data_root(tmp_path, capsys):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    with pytest.raises(SystemExit):
        cli.main(["--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--train-images: the image folder {tmp_path}/train2017 does not exist" in err


def test_the_logged_learning_rate_is_the_one_each_step_used(tiny_digits, tmp_path, monkeypatch):
    """The scheduler steps after the optimizer: reading the rate after it logged the next step's (step 0 of
    warm-up at 500x the rate it ran with, the epoch before a drop at the dropped rate)."""
    used = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    out = tmp_path / "run"
    schedule = ["--epochs", "2", "--lr-drops", "1", "--lr", "1e-3", "--eval-every", "2", "--log-steps"]
    cli.main([*FAST, *data_args(tiny_digits), *schedule, "--output-dir", str(out)])
    assert [lr for _, lr in _steps(out)] == used and used[0] < used[1]  # warm-up, then the drop
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"]["lr"] for r in records] == [used[1], used[3]]  # each epoch's last step


def test_a_run_from_a_backbone_file_resumes_evaluates_and_predicts_without_it(tiny_digits, tmp_path):
    """The checkpoint replaces the pre-trained weights; rebuilding the model read the file first, and a
    cleared cache or another machine stopped --resume, eval and predict with a traceback."""
    from torchvision.models import resnet

    from implicitkit_det.engine.predict import load_detector
    from implicitkit_det.models.backbone import FrozenStatsBatchNorm2d

    weights = tmp_path / "backbone.pth"
    torch.save(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1]).state_dict(), weights)
    out = tmp_path / "run"
    pretrained = ["--model-arg", f"backbone_weights={weights}", "--eval-every", "9"]
    cli.main([*FAST, *data_args(tiny_digits), *pretrained, "--epochs", "1", "--output-dir", str(out)])
    weights.unlink()
    cli.main(["--resume", str(out), "--epochs", "2"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert 0.0 <= cli.main(["eval", "--resume", str(out)])["AP"] <= 1.0
    backbone = load_detector(out).model.backbone
    # The pre-trained layout all the same: stem and first stage frozen, statistics fixed.
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    assert all(p.requires_grad for p in backbone.stages[1].parameters())
    assert isinstance(backbone.stem[1], FrozenStatsBatchNorm2d)


def test_training_on_from_an_earlier_checkpoint_in_its_own_folder_is_refused(tiny_digits, tmp_path, capsys):
    """--resume RUN/checkpoint_best.pth retrained the later epochs in RUN: checkpoint_last.pth overwritten,
    metrics.jsonl with epochs [0, 1, 2, 1, 2]."""
    out = tmp_path / "run"
    cli.main([*FAST, *data_args(tiny_digits), "--epochs", "2", "--keep-every", "1", "--output-dir", str(out)])
    last = (out / "checkpoint_last.pth").read_bytes()
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(out / "checkpoint_epoch0.pth"), "--epochs", "3"])
    assert "trains on from an earlier checkpoint of the run" in capsys.readouterr().err
    assert (out / "checkpoint_last.pth").read_bytes() == last
    # Without checkpoint_last.pth the later epoch's kept checkpoint tells (it was accepted, and overwritten);
    # a damaged last one is named, not a raw unpickling traceback.
    (out / "checkpoint_last.pth").rename(out / "aside.pth")
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(out / "checkpoint_epoch0.pth"), "--epochs", "3"])
    assert "where it would overwrite checkpoint_epoch1.pth" in capsys.readouterr().err
    (out / "checkpoint_last.pth").write_bytes(last[: len(last) // 2])
    with pytest.raises(SystemExit):
        cli.main(["--resume", str(out / "checkpoint_epoch0.pth"), "--epochs", "3"])
    assert "the run's latest checkpoint, to tell whether --resume goes back" in capsys.readouterr().err
    (out / "aside.pth").replace(out / "checkpoint_last.pth")
    # The newest epoch's own copy (a best that is also the last) continues the run as the folder does.
    cli.main(["--resume", str(out / "checkpoint_epoch1.pth"), "--epochs", "3"])
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
    ]
    # Evaluating an earlier one is fine, and so is a branch in a folder of its own.
    assert 0.0 <= cli.main(["eval", "--resume", str(out / "checkpoint_epoch0.pth")])["AP"] <= 1.0
    branch = tmp_path / "branch"
    branch.mkdir()
    (branch / "checkpoint_last.pth").write_bytes((out / "checkpoint_epoch0.pth").read_bytes())
    capsys.readouterr()
    cli.main(["--resume", str(branch), "--epochs", "2"])
    assert [json.loads(line)["epoch"] for line in (branch / "metrics.jsonl").read_text().splitlines()] == [1]
    # Its best is its own: it kept the parent's best AP and wrote no checkpoint_best.pth below it.
    assert (
        "checkpoint_best.pth starts again at the next evaluation (no checkpoint_best.pth"
        in capsys.readouterr().out
    )
    assert (branch / "checkpoint_best.pth").is_file()


def test_ctrl_c_during_an_iteration_stops_after_it_as_announced(tiny_digits, tmp_path, monkeypatch, capsys):
    """The stop was voted on before each step, so a Ctrl-C during iteration 1 stopped after iteration 2."""
    import os
    import signal

    import implicitkit_det.engine.train as train

    forward, calls = train.forward_train, []

    def interrupted_in_iteration_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)

    monkeypatch.setattr(train, "forward_train", interrupted_in_iteration_1)
    out = tmp_path / "run"
    argv = [*FAST, *data_args(tiny_digits), "--max-iters", "5", "--epochs", "1", "--output-dir", str(out)]
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert "stopping after this iteration" in capsys.readouterr().err
    progress = torch.load(out / "checkpoint_last.pth", weights_only=True)["progress"]
    assert progress["iteration"] == 2 and len(calls) == 2


def test_a_val_file_naming_the_classes_otherwise_is_refused(tiny_digits, tmp_path, capsys):
    """The same ids under swapped names trained, then scored and named every class as another."""
    swapped = json.loads(tiny_digits.annotations("val").read_text())
    names = [c["name"] for c in swapped["categories"]]
    for category, name in zip(swapped["categories"], [names[1], names[0], *names[2:]], strict=True):
        category["name"] = name
    (tmp_path / "swapped.json").write_text(json.dumps(swapped))
    with pytest.raises(SystemExit) as info:
        cli.main([*FAST, *data_args(tiny_digits), "--val-ann", str(tmp_path / "swapped.json"), "--epochs", "1",
                  "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert info.value.code == 2 and "have different categories" in capsys.readouterr().err


def test_evaluation_and_resume_say_what_does_not_apply(tiny_digits, tmp_path, capsys):
    run = tmp_path / "run"
    cli.main(
        [*FAST, *data_args(tiny_digits), "--epochs", "1", "--output-dir", str(run), "--refinement-curve", "0"]
    )
    assert not (run / "refinement_curve.json").exists()  # 0 is none (it drew a one-point curve)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # it named --lr-drops, which was never given
        cli.main(["eval", "--resume", str(run), *SIZES, "--epochs", "3"])
    assert "--epochs 3: an evaluation trains nothing" in capsys.readouterr().err
    cli.main([*FAST[2:], *data_args(tiny_digits), "--resume", str(run)])
    assert "has finished its 1 epochs: nothing to train" in capsys.readouterr().out
    # Options given again to a finished run take no effect: config.json keeps what the checkpoints hold.
    saved = (run / "config.json").read_text()
    cli.main([*FAST[2:], *data_args(tiny_digits), "--resume", str(run), "--lr", "1e-3", "--deq-steps", "5"])
    assert "the run has finished, so deq_steps, lr given again change nothing" in capsys.readouterr().out
    assert (run / "config.json").read_text() == saved


def test_digits_options_with_coco_data_are_refused(tiny_digits, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([*FAST, *data_args(tiny_digits), "--digits-train", "50", "--output-dir", str(tmp_path)])
    assert "--digits-train sizes the bundled digits set" in capsys.readouterr().err


def test_an_image_folder_of_another_split_is_named(tiny_digits, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(
            [
                *FAST,
                *data_args(tiny_digits),
                "--val-images",
                str(tmp_path),
                "--output-dir",
                str(tmp_path / "r"),
            ]
        )
    err = capsys.readouterr().err
    assert "the image folder does not belong to this annotation file" in err and "--val-images" in err


def test_a_checkpoint_rebuilds_its_pretrained_backbone_layout_from_its_own_options(tiny_digits, tmp_path):
    """The checkpoint's model record kept only the weights file's path: rebuilt from those options without
    the (machine-local) file, the backbone took the from-scratch layout (trained batch norm, no frozen stage)
    and its state dict still loaded, key for key. The record now writes the norm and frozen stages out."""
    from implicitkit_det.models.backbone import _DEPTHS, PRETRAINED_FROZEN_STAGES, PRETRAINED_NORM

    weights = tmp_path / "resnet10.pth"
    torch.save(_DEPTHS["resnet10"](weights=None).state_dict(), weights)
    out = tmp_path / "run"
    cli.main([*FAST, *data_args(tiny_digits), "--epochs", "1", "--output-dir", str(out),
              "--model-arg", f"backbone_weights={weights}"])  # fmt: skip
    record = torch.load(out / "checkpoint_last.pth", map_location="cpu", weights_only=True)["config"]
    options = {k: v for k, v in record["overrides"].items() if k != "backbone_weights"}
    assert options["backbone_norm"] == PRETRAINED_NORM
    assert options["frozen_stages"] == PRETRAINED_FROZEN_STAGES
    rebuilt = build_model(record["name"], record["num_classes"], **options)
    assert (
        rebuilt.backbone.norm == PRETRAINED_NORM
        and len(rebuilt.backbone.frozen) == PRETRAINED_FROZEN_STAGES + 1
    )


def test_a_resume_drops_what_the_logs_hold_past_its_checkpoint(tiny_digits, tmp_path, capsys):
    """A run that stopped after logging past its last checkpoint (a crash, or a second Ctrl-C, between an
    epoch's metrics line and its closing save; steps after a --checkpoint-every save) logged those epochs and
    iterations twice once resumed. The logs are rewound to the checkpoint's position first."""
    out = tmp_path / "run"
    run = [*FAST, *data_args(tiny_digits), "--epochs", "2", "--log-steps", "--keep-every", "1"]
    cli.main([*run, "--output-dir", str(out)])
    whole_metrics = (out / "metrics.jsonl").read_text().splitlines()
    whole_steps = (out / "steps.jsonl").read_text().splitlines()
    # As if the run had died after logging epoch 1 with epoch 0's checkpoint as its last, and a line cut short.
    (out / "checkpoint_last.pth").write_bytes((out / "checkpoint_epoch0.pth").read_bytes())
    with (out / "steps.jsonl").open("a") as f:
        f.write('{"epoch": 1, "iter')
    capsys.readouterr()
    cli.main(["--resume", str(out)])
    assert "note: dropped 4 log records past the checkpoint's position" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [0, 1] and len(steps) == len(whole_steps) == 4
    assert [(r["epoch"], r["iteration"]) for r in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(whole_metrics) == 2
    # An on/off option turned on can be turned off again on resume (it had no --no- form).
    cli.main(["--resume", str(out), "--epochs", "3", "--no-log-steps"])
    assert len((out / "steps.jsonl").read_text().splitlines()) == 4
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
    ]
