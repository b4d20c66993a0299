"""The benchmark scripts run end to end at their smallest sizes and write their tables and figures."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchdeq")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gradient_estimators
import solvers
import torch


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """The scripts set the thread count and the global seed; leave both as they were for other tests."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def test_solvers_benchmark_quick(tmp_path):
    result = solvers.main(["--quick", "--out", str(tmp_path)])
    text = result["report"].read_text()
    assert "| Anderson |" in text
    assert "Mixed difficulty" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {"solvers_trace.png", "solvers_ratio.png"}
    for comparison in result["comparisons"]:
        assert comparison.ours.run.calls >= 1 and comparison.theirs.run.calls >= 1
        assert comparison.wall_ratio > 0


def test_gradient_estimators_benchmark_quick(tmp_path):
    result = gradient_estimators.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "gradient_estimators.md").read_text()
    for name in gradient_estimators.estimators(1e-4):
        assert f"| {name} |" in text
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "gradient_estimators_cost.png",
        "gradient_estimators_training.png",
    }
    # Unrolled keeps every step's graph: its memory grows with the forward steps, IFT's does not.
    sweep = {(c.estimator, c.steps): c.peak_bytes for c in result["sweep_costs"]}
    steps = sorted({s for _, s in sweep})
    assert sweep[("Unrolled (Anderson)", steps[-1])] > sweep[("Unrolled (Anderson)", steps[0])]
    assert sweep[("Unrolled (FPI)", steps[-1])] > sweep[("Unrolled (FPI)", steps[0])]
    assert sweep[("IFT", steps[-1])] == sweep[("IFT", steps[0])]
    assert all(len(run.test_accuracy) == 1 for run in result["runs"])


def test_solver_memory_benchmark_tiny():
    import solver_memory

    rows = solver_memory.main(
        ["--batch", "8", "--dim", "16", "--steps", "2", "4", "--solvers", "FixedPointIteration",
         "--estimators", "JFB", "Unrolled", "--repeats", "1"]
    )  # fmt: skip
    assert [r["estimator"] for r in rows] == ["JFB", "Unrolled"]
    assert all(len(r["mib"]) == 2 for r in rows)


def test_solver_overhead_benchmark_tiny():
    import solver_overhead

    rows = solver_overhead.main(["--width", "8", "--batch", "4", "--steps", "4", "--repeats", "1"])
    assert [r[0] for r in rows] == ["FixedPointIteration"] * 2 + ["Anderson"] * 2 + ["Broyden"] * 2
    assert all(float(r[2]) > 0 for r in rows)  # every solver runs some operations of its own per step


def test_compile_benchmark_quick(tmp_path):
    import compile as compile_benchmark  # implicitkit only: torchdeq's compiles take a minute here

    rows = compile_benchmark.main(["--quick", "--libraries", "implicitkit", "--out", str(tmp_path)])
    assert "| FixedPointIteration + JFB | implicitkit |" in (tmp_path / "compile.md").read_text()
    assert [r.breaks for r in rows] == [1, 1]
    assert all(r.max_diff < 1e-5 for r in rows)


def test_linear_adjoints_benchmark_quick(tmp_path):
    import linear_adjoints

    table = linear_adjoints.main(["--quick", "--out", str(tmp_path)])
    # GMRES and DirectSolve solve every sample where the fixed-point adjoint diverges (eigenvalue -1.6)
    rows = [line for line in table.splitlines() if "eigenvalue -1.6" in line]
    assert any("FixedPointIteration" in r and "| 0/4 |" in r for r in rows)
    assert all("| 4/4 |" in r for r in rows if "GMRES" in r or "DirectSolve" in r)


def test_differentiation_modes_benchmark_quick(tmp_path):
    import differentiation_modes

    table = differentiation_modes.main(["--quick", "--out", str(tmp_path)])
    # forward mode and the exact penalty agree with their references to the solver's tolerance
    for line in table.splitlines()[2:]:
        assert float(line.split("|")[-3]) < 1e-6, line


def test_train_step_profile_quick(tmp_path):
    import train_step_profile

    train_step_profile.main(["--quick", "--out", str(tmp_path), "--no-memory"])
    text = (tmp_path / "train_step_profile.md").read_text()
    assert "| **step** |" in text and "| float32, stacked branches |" in text
    assert "GFLOP forward and backward" in text and "autograd nodes" in text
    calls = {
        line.split("|")[1].strip(): int(line.split("|")[-2])
        for line in text.splitlines()
        if line.startswith("| float32")
    }
    assert calls["float32, stacked branches"] < calls["float32"]  # one forward and backward for every branch


def test_train_step_profile_against_a_checkout(tmp_path):
    import train_step_profile

    # This checkout against itself: each version's step in its own process, the library imported from the
    # folder given; the same code must dispatch the same ATen calls.
    root = str(Path(train_step_profile.__file__).resolve().parents[1])
    train_step_profile.main(["--quick", "--out", str(tmp_path), "--no-memory", "--baseline", root])
    text = (tmp_path / "train_step_profile.md").read_text()
    rows = [
        line.split("|") for line in text.split(f"### Against {root}")[1].splitlines() if line.startswith("| ")
    ]
    assert [row[1].strip() for row in rows[1:]] == ["float32", "the recipe's precision"]
    for row in rows[1:]:
        assert row[-3].strip() == row[-2].strip() and int(row[-2]) > 1000  # ATen calls: baseline, this


def test_train_command_against_a_checkout(tmp_path):
    import train_command

    # This checkout against itself through the CLI, each run a fresh process importing the library from the
    # folder given: the same code trains to the same loss.
    root = str(Path(train_command.__file__).resolve().parents[1])
    train_command.main(["--quick", "--out", str(tmp_path), "--baseline", root])
    text = (tmp_path / "train_command.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| round") or "median" in line]
    assert [row[1].strip() for row in rows] == ["round 1", "**median**"]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
    losses = re.search(r"baseline ([0-9.]+), this ([0-9.]+)", text)
    assert losses is not None and losses[1] == losses[2] and float(losses[1]) > 0


def test_train_step_profile_of_a_stack_of_stages(tmp_path):
    import train_step_profile

    train_step_profile.main(["--quick", "--out", str(tmp_path), "--config", "adamixer_tiny"])
    text = (tmp_path / "train_step_profile_adamixer_tiny.md").read_text()
    assert "| decoder stages (6) forward |" in text and "| **step** |" in text
    assert "stacked RAG" not in text and "paper shape" not in text  # DEQ-only rows left out


def test_reproduction_verdicts_refuse_to_judge_models_that_learned_nothing():
    import reproduction

    near_zero = reproduction.verdict([0.0003, 0.0001], [0.0, 0.0002], floor=reproduction.AP_FLOOR)
    assert near_zero["verdict"].startswith("not judged: both below AP 0.05")
    learned = reproduction.verdict([0.30, 0.32], [0.20, 0.21], floor=reproduction.AP_FLOOR)
    assert learned["verdict"] == "holds"


def test_refinement_duplicates_statistics_on_a_fresh_detector():
    import refinement_duplicates

    from implicitkit_det.models import build_model

    sys.path.insert(0, str(Path(__file__).resolve().parent / "det"))
    from det_engine_toy import random_batch

    torch.manual_seed(0)
    model = build_model("deqdet_tiny", 10, num_queries=6).eval()
    batches = [random_batch(torch.Generator().manual_seed(i), batch=2, size=64, classes=10) for i in range(2)]
    stats = refinement_duplicates.step_statistics(model, batches, steps=3)
    assert len(stats) == 4
    # The box regressors start at zero: every refinement step keeps the boxes exactly where they were.
    assert [row["box move"] for row in stats] == [0.0, 0.0, 0.0, 0.0]
    for row in stats:
        assert all(0.0 <= row[k] <= 1.0 for k in ("found", "best IoU", "best score", "duplicates"))
        assert row["best IoU"] > 0.0  # random targets overlap some of the spread-out initial boxes


def test_reproduction_compares_convergence_over_the_epochs_both_train_at_the_full_rate():
    import reproduction

    # DEQDet's demo drops the rate before its 7th epoch, AdaMixer's before its 12th: the mean compares 6.
    assert reproduction.full_rate_epochs(["--epochs", "7", "--lr-drops", "6"]) == 6
    assert reproduction.full_rate_epochs(["--epochs", "12", "--lr-drops", "11", "--epochs", "3"]) == 3
    assert reproduction.full_rate_epochs(["--epochs", "1", "--lr-drops", ""]) == 1
    run = {"AP": 0.5, "AP50": 0.7, "AP75": 0.5, "AP_per_epoch": [{"AP": a} for a in (0.1, 0.3, 0.9)]}
    assert reproduction.metrics_of(run, 6, 2)[reproduction.FULL_RATE_MEAN] == pytest.approx(0.2)
    assert reproduction.metrics_of(run, 6, 2)[reproduction.HALFWAY] == 0.1  # after epoch 1 of 2
    assert reproduction.metrics_of(run, 6, 6)[reproduction.HALFWAY] == 0.9  # epoch 3 of 6
