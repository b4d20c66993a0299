"""DEQDet's early exit at inference: per-image stopping, reported steps, the fixed mode unchanged."""

from __future__ import annotations

import pytest
import torch

from implicitkit_det import cli
from implicitkit_det.models import DEQDet, build_model


def tiny(seed: int = 0, **overrides) -> DEQDet:
    torch.manual_seed(seed)
    return build_model("deqdet_tiny", 10, num_queries=6, test_steps=8, **overrides).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 96, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_fixed_mode_is_bitwise_f_applied_test_steps_times():
    model = tiny()
    x = images(2)
    out = model.predict(x)
    sizes = model.image_sizes(x)
    features = model.features(x)
    y = model.init_layer(model.queries(sizes), features, sizes)
    for _ in range(model.test_steps):
        y = model.refine_layer(y, features, sizes)
    reference = model.refine_layer.predict(y, sizes)
    assert torch.equal(out["pred_boxes"], reference["pred_boxes"])
    assert torch.equal(out["pred_logits"], reference["pred_logits"])
    assert model.last_steps.tolist() == [8, 8]
    model.test_steps = 0
    model.predict(x)
    assert model.last_steps.tolist() == [0, 0]


@pytest.mark.parametrize("solver", ["fixed", "anderson"])
@torch.no_grad()
def test_tolerance_reports_steps_per_image_within_test_steps(solver):
    model = tiny(test_solver=solver, test_tol=1e9)  # anderson solves to a tolerance: it is built with one
    x = images(3)
    model.test_tol = 1e9  # everything has converged after one application
    model.predict(x)
    assert model.last_steps.tolist() == [1, 1, 1]
    model.test_tol = 0.0  # nothing converges: the cap
    out = model.predict(x)
    assert model.last_steps.tolist() == [8, 8, 8]
    assert torch.isfinite(out["pred_boxes"]).all()
    model.test_tol = 0.05
    model.predict(x)
    assert model.last_steps.dtype == torch.int64 and model.last_steps.shape == (3,)
    assert ((model.last_steps >= 1) & (model.last_steps <= 8)).all()


@torch.no_grad()
def test_fixed_iteration_to_the_cap_equals_the_fixed_count():
    model = tiny()
    x = images(2)
    fixed = model.predict(x)
    model.test_tol = 0.0
    capped = model.predict(x)  # the scaled state changes the rounding only
    torch.testing.assert_close(capped["pred_boxes"], fixed["pred_boxes"], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_tolerance_stops_at_the_first_step_within_it():
    model = tiny()
    x = images(1)
    sizes = model.image_sizes(x)
    features = model.features(x)
    y = model.init_layer(model.queries(sizes), features, sizes)
    changes = []  # the residual of the scaled state, written out
    for _ in range(model.test_steps):
        fy = model.refine_layer(y, features, sizes)
        dc = (fy["content"] - y["content"]).pow(2).sum() / y["content"][0].numel()
        w = sizes[0].flip(0).to(fy["xyzr"])
        dxy = ((fy["xyzr"][..., :2] - y["xyzr"][..., :2]) / w).pow(2).sum() / 6
        dzr = (fy["xyzr"][..., 2:] - y["xyzr"][..., 2:]).pow(2).sum() / 6
        changes.append(float((dc + dxy + dzr).sqrt()))
        y = fy
    k = 3  # a tolerance between the 3rd and the 4th change stops at step 4 when they decrease
    assert changes[k] < changes[k - 1]
    model.test_tol = (changes[k] + changes[k - 1]) / 2
    model.predict(x)
    first = next(i for i, c in enumerate(changes) if c <= model.test_tol) + 1
    assert model.last_steps.tolist() == [first]


@pytest.mark.parametrize("solver", ["fixed", "anderson"])
@torch.no_grad()
def test_steps_per_image_do_not_depend_on_the_rest_of_the_batch(solver):
    model = tiny(test_solver=solver, test_tol=0.2)
    x = images(4, seed=5)  # equal sizes: no padding differs between a batch and an image alone
    seen = set()
    for tol in (0.2, 0.1, 0.05):
        model.test_tol = tol
        batched = model.predict(x)
        steps = model.last_steps.clone()
        alone = []
        for i in range(len(x)):
            out = model.predict(x[i : i + 1])
            alone.append(int(model.last_steps))
            torch.testing.assert_close(out["pred_boxes"][0], batched["pred_boxes"][i], rtol=1e-4, atol=1e-4)
        assert steps.tolist() == alone
        seen.update(alone)
    assert len(seen) > 1  # the tolerances do stop images at different steps


def test_cli_reports_mean_steps_with_deq_tol(tiny_digits, tmp_path, capsys):
    common = [
        "--image-size",
        "64",
        "--max-size",
        "96",
        "--workers",
        "0",
        "--data-root",
        str(tiny_digits.root),
    ]
    out = tmp_path / "run"
    cli.main(
        ["--config", "deqdet_tiny", *common, "--batch-size", "2", "--epochs", "1", "--max-iters", "1",
         "--warmup-iters", "1", "--model-arg", "train_steps=2", "--model-arg", "supervise_steps=[1,2]",
         "--model-arg", "num_queries=6", "--output-dir", str(out)]
    )  # fmt: skip
    capsys.readouterr()
    stats = cli.main(
        ["--eval-only", "--resume", str(out / "checkpoint_last.pth"), *common, "--output-dir", str(tmp_path / "e"),
         "--deq-steps", "5", "--deq-tol", "1e9"]
    )  # fmt: skip
    assert stats["mean_steps"] == 1.0 and "steps/image 1.00" in capsys.readouterr().out
    stats = cli.main(
        ["--eval-only", "--resume", str(out / "checkpoint_last.pth"), *common, "--output-dir", str(tmp_path / "e"),
         "--deq-steps", "5", "--deq-tol", "0", "--deq-solver", "anderson"]
    )  # fmt: skip
    assert stats["mean_steps"] == 5.0
