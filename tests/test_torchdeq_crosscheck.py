"""Cross-check with torchdeq 0.1.0: same cell, same tolerance, same fixed point."""

from __future__ import annotations

import pytest
import torch
from problems import contraction

import implicitkit as ik

torchdeq_solver = pytest.importorskip("torchdeq.solver")


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda kw: ik.FixedPointIteration(**kw), "fixed_point_iter"),
        (lambda kw: ik.Anderson(m=5, **kw), "anderson"),
        (lambda kw: ik.Broyden(**kw), "broyden"),
    ],
)
def test_same_fixed_point_as_torchdeq(ours, theirs, gen, capsys):
    a = contraction(16, 0.9, gen)
    x = torch.randn(4, 16, generator=gen, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ a.T + x)

    tol = 1e-10
    z_ours, stats = ik.fixed_point(
        f, torch.zeros_like(x), solver=ours(dict(tol=tol, max_iter=500, stop_mode="abs"))
    )
    solve = torchdeq_solver.get_solver(theirs)
    z_theirs, _, info = solve(f, torch.zeros_like(x), max_iter=500, tol=tol, stop_mode="abs")
    assert stats.converged.all()
    # Both are within tol of the unique fixed point of a contraction: distance <= 2 tol / (1 - 0.9) + slack.
    assert torch.linalg.vector_norm(z_ours - z_theirs, dim=1).max() < 1e-8
    with capsys.disabled():
        print(
            f"\n{theirs}: implicitkit steps per sample {stats.nstep.tolist()}, torchdeq steps (batch) {info['nstep']}"
        )
