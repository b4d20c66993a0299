"""The training loop, NaN detection, AMP, checkpoint round trips and the evaluation glue."""

from __future__ import annotations

import math
import os

import pytest
import torch
from det_engine_toy import ToyDetector, random_batch

from implicitkit_det.engine import (
    NonFiniteLossError,
    Schedule,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_checkpoint,
    make_grad_scaler,
    rescale_to_original,
    save_checkpoint,
    train_one_epoch,
)
from implicitkit_det.evaluation import CocoEvaluator

CPU = torch.device("cpu")


def batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [random_batch(gen) for _ in range(n)]


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = ToyDetector()
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    sched = build_scheduler(opt, Schedule(2, (1,), warmup_iters=3), iters_per_epoch=4)
    return model, opt, sched


def run(model, opt, sched, loader, **kw):
    return train_one_epoch(model, loader, opt, device=CPU, epoch=0, scheduler=sched, print_freq=0, **kw)


def test_an_epoch_trains_and_reports_averages():
    model, opt, sched = setup()
    data = batches(4)
    first = run(model, opt, sched, data)
    assert first["iters"] == 4 and sched.last_epoch == 4
    for key in ("loss", "loss_focal", "loss_l1", "loss_giou", "focal", "l1", "giou", "lr", "grad_norm"):
        assert key in first
    later = [run(model, opt, sched, data)["loss"] for _ in range(5)]
    assert later[-1] < first["loss"]
    assert run(model, opt, sched, data, max_iters=2)["iters"] == 2


def test_gradients_are_clipped():
    model, opt, _ = setup()
    seen = []
    orig_step = opt.step

    def step(*a, **k):
        seen.append(
            torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
            )
        )
        return orig_step(*a, **k)

    opt.step = step
    stats = run(model, opt, None, batches(2), clip_max_norm=1e-3)
    assert stats["grad_norm"] > 1e-3  # reported before clipping
    assert all(n <= 1e-3 * (1 + 1e-4) for n in seen)


class PoisonedLoss(torch.nn.Module):
    """Wraps a model; the total loss of call number `at` is NaN (the outputs stay finite)."""

    def __init__(self, model, at):
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, images, targets, mask=None):
        losses = self.model(images, targets, mask=mask)
        if self.calls == self.at:
            losses["loss"] = losses["loss"] * float("nan")
        self.calls += 1
        return losses


def test_nan_loss_stops_with_a_clear_message():
    model, opt, sched = setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError) as info:
        train_one_epoch(
            PoisonedLoss(model, at=1), batches(3), opt, device=CPU, epoch=3, scheduler=sched, print_freq=0
        )
    msg = str(info.value)
    assert "epoch 3, iteration 1" in msg and "loss nan" in msg and "loss_giou" in msg and "--lr" in msg
    assert isinstance(info.value, FloatingPointError)
    # Stopped before the backward pass: only the first iteration's update happened, and no NaN got in.
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_nan_predictions_stop_naming_the_iteration():
    model, opt, sched = setup()
    data = batches(3)
    data[2].images[0, 0, 0, 0] = float("nan")  # the model's outputs on iteration 2 are NaN
    with pytest.raises(NonFiniteLossError, match="epoch 0, iteration 2: matching cost"):
        run(model, opt, sched, data)


def test_bf16_autocast_on_the_cpu():
    model, opt, sched = setup()
    scaler = make_grad_scaler(CPU, amp=True)
    assert not scaler.is_enabled()  # bf16 needs no loss scaling
    stats = run(model, opt, sched, batches(2), amp=True, scaler=scaler)
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_checkpoint_resume_gives_identical_next_steps(tmp_path):
    data = batches(4)
    model, opt, sched = setup()
    run(model, opt, sched, data[:2])
    path = save_checkpoint(
        tmp_path / "ck" / "checkpoint.pth",
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=0,
        config={"name": "toy", "num_classes": 3, "overrides": {}},
        args={"lr": 1e-3},
    )
    assert path is not None and path.is_file()
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # the temporary file was renamed away
    reference = run(model, opt, sched, data[2:])  # dropout draws from the random state saved above
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, sched2 = setup(seed=123)  # different initial weights and random state
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, restore_rng=True)
    assert state["epoch"] == 0 and state["config"]["name"] == "toy" and state["args"] == {"lr": 1e-3}
    assert sched2.last_epoch == 2
    resumed = run(model2, opt2, sched2, data[2:])
    assert resumed["loss"] == reference["loss"]
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]


def test_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="--output-dir"):
        load_checkpoint(tmp_path / "missing.pth")
    model, opt, sched = setup()
    path = save_checkpoint(
        tmp_path / "c.pth",
        model=model,
        optimizer=opt,
        scheduler=sched,
        epoch=0,
        config={"name": "toy"},
        args={},
    )
    with pytest.raises(RuntimeError, match="same --config"):
        load_checkpoint(path, model=ToyDetector(num_classes=5))


def test_rescale_to_original():
    det = [
        {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "scores": torch.ones(1), "labels": torch.zeros(1)}
    ]
    t = [{"size": torch.tensor([100, 200]), "orig_size": torch.tensor([50, 400])}]
    out = rescale_to_original(det, t)
    assert torch.allclose(out[0]["boxes"], torch.tensor([[20.0, 10.0, 60.0, 20.0]]))


class Oracle(torch.nn.Module):
    """Returns, for each batch in turn, the ground truth as detections in input pixels."""

    def __init__(self, loader):
        super().__init__()
        self.answers = [
            [
                {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
                for t in b.targets
            ]
            for b in loader
        ]

    def forward(self, images, mask=None):
        return self.answers.pop(0)


def test_evaluate_scores_perfect_detections_as_one():
    data = batches(2)
    gt = {
        "images": [{"id": i, "width": 64, "height": 64, "file_name": f"{i}.png"} for i in (0, 1)],
        "categories": [{"id": 10 + c, "name": str(c)} for c in range(3)],
        "annotations": [],
    }
    for b in data[:1]:
        for t in b.targets:
            for box, lab in zip(t["boxes"].tolist(), t["labels"].tolist()):
                x0, y0, x1, y1 = box
                gt["annotations"].append(
                    {
                        "id": len(gt["annotations"]) + 1,
                        "image_id": t["image_id"],
                        "category_id": 10 + lab,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                    }
                )
    stats = evaluate(
        Oracle(data[:1]),
        data[:1],
        CocoEvaluator(gt),
        device=CPU,
        label_to_category_id=[10, 11, 12],
        verbose=False,
    )
    assert stats["AP"] == pytest.approx(1.0) and stats["images"] == 2
    assert set(stats) >= {
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    }


class NoLossDict(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None, mask=None):
        return [{"boxes": torch.zeros(0, 4)}]  # detections even in training mode


def test_wrong_model_outputs_are_explained():
    model = NoLossDict()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="dict of scalar loss tensors"):
        train_one_epoch(model, batches(1), opt, device=CPU, epoch=0, print_freq=0)
    with pytest.raises(TypeError, match="one \\{'boxes', 'scores', 'labels'\\} dict per image"):
        evaluate(
            model, batches(1), CocoEvaluator({"images": [], "categories": []}), device=CPU, verbose=False
        )
    # A misspelt frame skipped the rescale to the stored image's pixels: AP 0 without a word.
    with pytest.raises(ValueError, match=r"boxes_in must be 'input' or 'original', got 'Input'"):
        evaluate(
            model, batches(1), CocoEvaluator({"images": [], "categories": []}), device=CPU, boxes_in="Input"
        )


def test_a_step_the_grad_scaler_skipped_is_counted_not_averaged_into_the_epochs_grad_norm():
    """One skipped float16 step (norm inf) made the epoch's grad_norm inf, and metrics.jsonl invalid JSON."""
    from implicitkit_det.engine.train import EpochMeter, StepResult

    meter = EpochMeter()
    for norm in (0.5, math.inf, 1.5, math.nan):
        meter.add(StepResult({"loss": 1.0}, norm, lr=1e-4))
    stats = meter.stats(lr=0.0)
    assert stats["grad_norm"] == 1.0 and stats["skipped_steps"] == 2 and stats["iters"] == 4
    assert stats["lr"] == 1e-4  # the rate the last step used
    assert "skipped_steps" not in EpochMeter().stats(lr=0.0)
    resumed = EpochMeter(**meter.state())  # a mid-epoch checkpoint keeps the count
    assert resumed.stats(lr=0.0) == stats
