"""Structured states: tuples, lists and dicts of tensors, and clear errors when the structure changes."""

from __future__ import annotations

import pytest
import torch
from problems import contraction

import implicitkit as ik


def test_dict_state_with_different_shapes_reaches_the_analytic_fixed_point():
    """``content <- 0.5 content + c``, ``boxes <- 0.25 boxes + b``: fixed points ``2c`` and ``4b / 3``."""
    c = torch.randn(2, 5, 8, dtype=torch.float64)
    b = torch.rand(2, 5, 4, dtype=torch.float64)

    def f(state):
        return {"content": 0.5 * state["content"] + c, "boxes": 0.25 * state["boxes"] + b}

    z0 = {"content": torch.zeros_like(c), "boxes": torch.zeros_like(b)}
    z, stats = ik.fixed_point(f, z0, solver=ik.Anderson(tol=1e-12, max_iter=100, stop_mode="abs"))
    assert set(z) == {"content", "boxes"} and z["boxes"].shape == (2, 5, 4)
    assert torch.allclose(z["content"], 2 * c, atol=1e-10)
    assert torch.allclose(z["boxes"], 4 * b / 3, atol=1e-10)
    assert stats.nstep.shape == (2,)


def test_leaf_dtypes_are_kept(gen):
    a = contraction(4, 0.5, gen).float()

    def f(state):
        x, y = state
        return torch.tanh(x @ a.T), 0.5 * y + 1

    z0 = (torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.float64))
    (x, y), _ = ik.fixed_point(f, z0, solver=ik.FixedPointIteration(tol=1e-10, max_iter=200))
    assert x.dtype == torch.float32 and y.dtype == torch.float64
    assert torch.allclose(y, torch.full_like(y, 2.0))


@pytest.mark.parametrize(
    "cell, message",
    [
        (lambda s: (s[0],), "different structure"),
        (lambda s: {"a": s[0], "b": s[1]}, "different structure"),
        (lambda s: (s[0], s[1][:, :2]), "changed the shape of state leaf 1"),
        (lambda s: (s[0], "oops"), "not a tensor"),
    ],
)
def test_cell_that_changes_the_structure_is_named(cell, message):
    z0 = (torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises((ValueError, TypeError), match=message):
        ik.fixed_point(cell, z0)


@pytest.mark.parametrize(
    "z0, message",
    [
        ((torch.zeros(2, 3), torch.zeros(3, 3)), "batch size 3 but leaf 0 has 2"),
        ((torch.zeros(2, 3), 1.0), "not a tensor"),
        (torch.tensor(1.0), "scalar"),
        ((), "empty"),
        (torch.zeros(2, 3, dtype=torch.long), "floating point"),
    ],
)
def test_bad_initial_states_are_named(z0, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ik.fixed_point(lambda z: z, z0)
