"""The detector benchmark runs end to end at tiny shapes and writes its tables and raw numbers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import deqdet_vs_adamixer


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """The script sets the thread count and the global seed; leave both as they were for other tests."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def test_quick_run_writes_both_tables(tmp_path):
    raw = deqdet_vs_adamixer.main(["--quick", "--in-process", "--out", str(tmp_path)])
    text = (tmp_path / "deqdet_vs_adamixer_tiny_quick.md").read_text()
    assert "| DEQDet |" in text and "| AdaMixer, 6 stages |" in text
    assert "| branch-wise |" in text and "| one graph |" in text
    assert json.loads((tmp_path / "deqdet_vs_adamixer_tiny_quick.json").read_text()) == raw
    by_name = {row["model"]: row for row in raw["models"]}
    # DEQDet applies G once and F test_steps (21) times; AdaMixer each of its stages once.
    assert by_name["DEQDet"]["layers_per_image"] == 22
    assert by_name["AdaMixer, 6 stages"]["layers_per_image"] == 6
    assert by_name["DEQDet"]["parameters"] < by_name["AdaMixer, 6 stages"]["parameters"]
    assert len(raw["memory"]) == 4 and all(row["step_s"] > 0 for row in raw["memory"])
