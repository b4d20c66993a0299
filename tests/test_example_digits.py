"""The digits example trains a DEQ classifier to its stated accuracy (the README's main job)."""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

import implicitkit as ik

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wrap_any_module.py"


@pytest.mark.slow
def test_digits_deq_classifier_reaches_95_percent(capsys):
    spec = importlib.util.spec_from_file_location("wrap_any_module", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ik.FixedPointWarning)  # failures are counted in the output instead
        accuracy = module.main([])
    assert accuracy >= 0.95
    out = capsys.readouterr().out
    assert "backward steps" in out and "test solve: Anderson" in out
    at_tol = [int(share) for share in re.findall(r"\(\s*(\d+)% at tol\)", out)]
    # From random weights few samples converge; once the cell has trained, nearly all.
    assert len(at_tol) == 12 and at_tol[0] < 90 and at_tol[-1] >= 95
