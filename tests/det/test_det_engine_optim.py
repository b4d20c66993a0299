"""Optimiser parameter groups and the warm-up + step schedule, at chosen iterations."""

from __future__ import annotations

import pytest
import torch
from det_engine_toy import ToyDetector

from implicitkit_det.engine import SCHEDULES, Schedule, build_optimizer, build_scheduler, param_groups


def test_groups_follow_the_recipe():
    model = ToyDetector()
    model.backbone[0].weight.requires_grad_(False)  # a frozen stem stays out of the optimiser
    groups = {g["name"]: g for g in param_groups(model, lr=2.5e-5, weight_decay=0.01)}
    assert set(groups) == {"base", "decoder"}
    assert groups["base"]["lr"] == pytest.approx(2.5e-5) and groups["base"]["weight_decay"] == pytest.approx(
        0.01
    )
    assert groups["decoder"]["lr"] == pytest.approx(1e-4) and groups["decoder"][
        "weight_decay"
    ] == pytest.approx(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["decoder"]["params"]} == {
        n for n, _ in model.named_parameters() if n.startswith("decoder.")
    }
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)  # each trainable parameter exactly once
    assert id(model.backbone[0].weight) not in grouped


def test_no_decay_option_exempts_norms_and_biases():
    model = ToyDetector()
    groups = {g["name"]: g for g in param_groups(model, lr=1.0, weight_decay=0.01, no_decay_norm_bias=True)}
    assert set(groups) == {"base", "base_no_decay", "decoder", "decoder_no_decay"}
    assert (
        groups["base_no_decay"]["weight_decay"] == 0.0 and groups["decoder_no_decay"]["weight_decay"] == 0.0
    )
    assert groups["decoder_no_decay"]["lr"] == pytest.approx(4.0)
    exempt = {id(p) for name in ("base_no_decay", "decoder_no_decay") for p in groups[name]["params"]}
    assert id(model.backbone[1].weight) in exempt  # GroupNorm weight
    assert id(model.decoder[1].weight) in exempt  # LayerNorm weight
    assert id(model.cls.bias) in exempt
    assert id(model.cls.weight) not in exempt and id(model.query.weight) not in exempt


def test_schedule_factor_at_chosen_iterations():
    s = SCHEDULES["1x"]  # 12 epochs, drops at 8 and 11, 500 warm-up iterations from 0.001
    ipe = 1000
    assert s.factor(0, ipe) == pytest.approx(0.001)
    assert s.factor(250, ipe) == pytest.approx(0.001 + 0.999 * 0.5)
    assert s.factor(500, ipe) == pytest.approx(1.0)
    assert s.factor(8 * ipe - 1, ipe) == pytest.approx(1.0)
    assert s.factor(8 * ipe, ipe) == pytest.approx(0.1)
    assert s.factor(11 * ipe - 1, ipe) == pytest.approx(0.1)
    assert s.factor(11 * ipe, ipe) == pytest.approx(0.01)
    two = SCHEDULES["2x"]
    assert (two.epochs, two.drops) == (24, (16, 22))
    assert two.factor(16 * ipe - 1, ipe) == pytest.approx(1.0) and two.factor(16 * ipe, ipe) == pytest.approx(
        0.1
    )
    assert two.factor(22 * ipe, ipe) == pytest.approx(0.01)
    # Warm-up and a drop can overlap (short epochs): the factors multiply.
    assert Schedule(4, (1,), warmup_iters=10).factor(5, 4) == pytest.approx((0.001 + 0.999 * 0.5) * 0.1)


def test_scheduler_steps_per_iteration_and_keeps_the_decoder_multiplier():
    model = ToyDetector()
    opt = build_optimizer(model, lr=2.5e-5, weight_decay=0.01)
    sched = build_scheduler(opt, Schedule(3, (1, 2), warmup_iters=4), iters_per_epoch=5)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    base, dec = zip(*seen)
    assert base[0] == pytest.approx(2.5e-8) and dec[0] == pytest.approx(1e-7)
    assert base[2] == pytest.approx(2.5e-5 * (0.001 + 0.999 * 0.5))
    assert base[4] == pytest.approx(2.5e-5) and dec[4] == pytest.approx(1e-4)
    assert base[5] == pytest.approx(2.5e-6) and dec[5] == pytest.approx(1e-5)  # epoch 1
    assert base[10] == pytest.approx(2.5e-7)  # epoch 2


def test_with_epochs_scales_the_drops():
    assert SCHEDULES["1x"].with_epochs(6).drops == (4, 5)
    assert SCHEDULES["2x"].with_epochs(12).drops == (8, 11)
    assert SCHEDULES["1x"].with_epochs(1).drops == ()
    # Both 1x drops land on epoch 2 of 3: both kept, the last epoch at 0.01x as in the full schedule.
    three = SCHEDULES["1x"].with_epochs(3)
    assert three.drops == (2, 2) and three.factor(2 * 1000, 1000) == pytest.approx(0.01)  # past warm-up
    with pytest.raises(ValueError, match="increasing"):
        Schedule(12, (11, 8))


def test_a_model_without_trainable_parameters_is_refused():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, lr=1.0, weight_decay=0.0)
