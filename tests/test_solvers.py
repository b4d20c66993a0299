"""Solvers: convergence on maps with known fixed points, per-sample stopping and failure reporting."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import contraction

import implicitkit as ik

SOLVERS = {
    "picard": lambda **kw: ik.FixedPointIteration(**kw),
    "damped": lambda **kw: ik.FixedPointIteration(damping=0.8, **kw),
    "anderson": lambda **kw: ik.Anderson(**kw),
    "broyden": lambda **kw: ik.Broyden(**kw),
}


def affine_problem(batch: int, dim: int, rate: float, seed: int):
    """``f(z) = z A^T + b`` with its exact fixed point ``b (I - A^T)^-1``."""
    g = torch.Generator().manual_seed(seed)
    a = contraction(dim, rate, g)
    b = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - a, b.T).T
    return (lambda z: z @ a.T + b), b, exact


@pytest.mark.parametrize("name", SOLVERS)
@settings(max_examples=12, deadline=None)
@given(
    dim=st.integers(2, 24),
    batch=st.integers(1, 5),
    rate=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["abs", "rel"]),
)
def test_reaches_tol_on_random_contractions(name, dim, batch, rate, seed, mode):
    f, b, exact = affine_problem(batch, dim, rate, seed)
    tol = 1e-9
    solver = SOLVERS[name](tol=tol, max_iter=2000, stop_mode=mode)
    z, stats = ik.fixed_point(f, torch.zeros_like(b), solver=solver)
    assert stats.converged.all(), stats
    assert (stats.residual <= tol).all()
    # The value is f(z_k) for the step k with residual r = ||f(z_k) - z_k||; for a contraction with rate L,
    # ||f(z_k) - z*|| <= L ||z_k - z*|| <= L r / (1 - L) (r times ||f(z_k)|| in rel mode).
    scale = 1.0 if mode == "abs" else (torch.linalg.vector_norm(z, dim=1) + 1e-8)
    err = torch.linalg.vector_norm(z - exact, dim=1)
    assert (err <= stats.residual * scale * rate / (1 - rate) * 1.01 + 1e-12).all()


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_nonlinear_fixed_point_is_a_fixed_point(name, gen):
    a = contraction(16, 0.8, gen)
    x = torch.randn(8, 16, generator=gen, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ a.T + x)

    solver = SOLVERS[name](tol=1e-11, max_iter=500, stop_mode="abs")
    z, stats = ik.fixed_point(f, torch.zeros_like(x), solver=solver)
    assert stats.converged.all()
    assert torch.linalg.vector_norm(f(z) - z, dim=1).max() < 1e-10


def test_anderson_needs_fewer_steps_than_picard_on_slow_map(gen):
    # Symmetric with eigenvalues spread over [0, 0.97]: plain iteration converges at rate ~0.97.
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0, 0.97, 32, dtype=torch.float64)) @ q.T
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64)

    def f(z):
        return z @ a.T + x + 0.01 * torch.sin(z)

    kw = dict(tol=1e-8, max_iter=1000, stop_mode="rel")
    _, plain = ik.fixed_point(f, torch.zeros_like(x), solver=ik.FixedPointIteration(**kw))
    _, anderson = ik.fixed_point(f, torch.zeros_like(x), solver=ik.Anderson(m=6, **kw))
    _, broyden = ik.fixed_point(f, torch.zeros_like(x), solver=ik.Broyden(**kw))
    assert plain.converged.all() and anderson.converged.all() and broyden.converged.all()
    assert anderson.nstep.max() * 3 < plain.nstep.min(), (anderson.nstep, plain.nstep)
    assert broyden.nstep.max() < plain.nstep.min()


@pytest.mark.parametrize("name", SOLVERS)
def test_batch_composition_invariance(name, gen):
    """A sample's value and step count do not depend on the other samples in the batch."""
    a = contraction(12, 0.9, gen)
    # Mixed difficulty: inputs of very different scales need very different step counts.
    scales = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0], dtype=torch.float64)
    x = torch.randn(6, 12, generator=gen, dtype=torch.float64) * scales[:, None]

    def cell(x):
        return lambda z: torch.tanh(z @ a.T + x)

    solver = SOLVERS[name](tol=1e-7, max_iter=300, stop_mode="abs")
    z_all, stats_all = ik.fixed_point(cell(x), torch.zeros_like(x), solver=solver)
    assert stats_all.converged.all()
    assert len(set(stats_all.nstep.tolist())) > 1, "the problem should have mixed difficulty"
    for i in range(len(x)):
        z_one, stats_one = ik.fixed_point(cell(x[i : i + 1]), torch.zeros_like(x[i : i + 1]), solver=solver)
        assert torch.allclose(z_one[0], z_all[i], atol=1e-6, rtol=0)
        assert int(stats_one.nstep[0]) == int(stats_all.nstep[i])


def test_best_iterate_is_returned_and_trace_is_recorded():
    """A map that jumps away after step 2: the solver returns step 2's value, not the last one."""
    images = iter([1.0, 1.1, 5.0, 5.5])

    def f(z):
        return torch.full_like(z, next(images))

    with torch.no_grad():  # no gradient to attach, so the map is called exactly four times
        z, stats = ik.fixed_point(
            f,
            torch.zeros(1, 3, dtype=torch.float64),
            solver=ik.FixedPointIteration(tol=1e-3, max_iter=4, stop_mode="abs"),
        )
    root3 = math.sqrt(3)
    assert torch.equal(z, torch.full((1, 3), 1.1, dtype=torch.float64))
    assert stats.trace[:, 0].tolist() == pytest.approx([root3, 0.1 * root3, 3.9 * root3, 0.5 * root3])
    assert stats.residual[0] == pytest.approx(0.1 * root3)
    assert int(stats.nstep[0]) == 4 and not stats.converged[0]


@pytest.mark.parametrize("name", SOLVERS)
def test_map_without_fixed_point_returns_unconverged_in_bounded_time(name):
    """``f(z) = z + 1`` moves every point by exactly 1: no solver can converge, none may hang."""
    start = time.perf_counter()
    _z, stats = ik.fixed_point(
        lambda z: z + 1.0,
        torch.zeros(3, 4, dtype=torch.float64),
        solver=SOLVERS[name](tol=1e-6, max_iter=40, stop_mode="abs"),
    )
    assert time.perf_counter() - start < 10
    assert not stats.converged.any()
    assert (stats.nstep <= 40).all()
    assert torch.allclose(stats.residual, torch.full((3,), 2.0, dtype=torch.float64))
    assert "did not reach tol" in stats.failure_message()


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_rotation_is_reported_unconverged(damping, gen):
    """A rotation by 90 degrees plus a shift has a fixed point but plain iteration circles around it."""
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    solver = ik.FixedPointIteration(damping=damping, tol=1e-10, max_iter=30, stop_mode="abs")
    _, stats = ik.fixed_point(lambda z: 1.2 * z @ rotation.T + x, torch.zeros_like(x), solver=solver)
    assert not stats.converged.any()
    assert (stats.nstep <= 30).all()


def test_divergence_is_detected_early():
    _z, stats = ik.fixed_point(
        lambda z: 3.0 * z + 1.0,
        torch.ones(2, 4, dtype=torch.float64),
        solver=ik.FixedPointIteration(tol=1e-8, max_iter=1000),
    )
    assert stats.diverged.all() and not stats.converged.any()
    assert stats.nstep.max() < 20
    assert "diverged" in stats.failure_message()


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_in_input_is_reported_and_isolated(name, gen):
    a = contraction(5, 0.5, gen)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    x[1, 2] = float("nan")
    z, stats = ik.fixed_point(
        lambda z: torch.tanh(z @ a.T + x), torch.zeros_like(x), solver=SOLVERS[name](tol=1e-9)
    )
    assert stats.nonfinite.tolist() == [False, True, False]
    assert stats.converged.tolist() == [True, False, True]
    assert torch.isfinite(z[[0, 2]]).all()
    assert "NaN" in stats.failure_message()


def test_throw_raises_with_the_cause():
    solver = ik.FixedPointIteration(tol=1e-12, max_iter=3, throw=True)
    with pytest.raises(ik.FixedPointError, match=r"did not reach tol.*raise max_iter"):
        ik.fixed_point(lambda z: 0.9 * z + 1.0, torch.zeros(2, 3), solver=solver)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stop_mode="max"), "stop_mode"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=-1.0), "tol"),
    ],
)
def test_bad_solver_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ik.Anderson(**kwargs)


def test_capture_returns_states_after_requested_steps():
    solver = ik.FixedPointIteration(tol=None, max_iter=5, stop_mode="abs")
    sol = ik.fixed_point(
        lambda z: 0.5 * z + 1.0, torch.zeros(1, 1, dtype=torch.float64), solver=solver, capture=(1, 3)
    )
    expected = {1: 1.0, 3: 1.75}  # z_k = 2 - 2^(1-k)
    with torch.no_grad():
        got = {k: float(z) for k, z in zip(sol.path.steps, sol.path)}
    assert got == expected


def test_a_warning_ignored_once_still_shows_when_the_filter_allows_it():
    """The first failing solve runs under "ignore": it shows nothing, so it must not use up the call site."""

    def solve() -> None:
        ik.fixed_point(lambda z: 0.99 * z + 1.0, torch.zeros(2, 3), solver=ik.FixedPointIteration(max_iter=3))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        solve()
        warnings.simplefilter("default")
        solve()
        solve()  # shown once per call site under "default"
    assert [w.category for w in caught] == [ik.FixedPointWarning]


@pytest.mark.parametrize(
    ("make", "name", "bad"),
    [
        (lambda v: ik.FixedPointIteration(max_iter=v), "max_iter", 2.9),  # was 2 steps
        (lambda v: ik.Anderson(max_iter=v), "max_iter", True),  # was 1 step
        (lambda v: ik.Anderson(m=v), "m", 1.9),  # was m=1
        (lambda v: ik.Broyden(m=v), "m", 2.5),
        (lambda v: ik.Neumann(k=v), "k", 0.5),  # was k=0: plain JFB
        (lambda v: ik.Phantom(k=v), "k", 2.25),
        (lambda v: ik.RAG(k=v), "k", 1.5),
        (lambda v: ik.GMRES(restart=v), "restart", 2.5),
        (lambda v: ik.Unrolled(checkpoint_every=v), "checkpoint_every", 1.5),
        (lambda v: ik.Reversible(checkpoint_every=v), "checkpoint_every", 2.5),  # was a float step modulus
        (lambda v: ik.jacobian_frobenius(torch.tanh, torch.ones(1, 2), n_samples=v), "n_samples", 1.5),
        (lambda v: ik.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3), capture=(v,)), "capture step", 2.5),
    ],
)
def test_a_count_takes_whole_numbers_and_refuses_anything_else(make, name, bad):
    make(np.int64(2))  # numpy and torch integer scalars are counts, and whole floats (1e3)
    make(torch.tensor(2))
    make(2.0)
    with pytest.raises(TypeError, match=rf"{name} must be a whole number, got {bad!r}"):
        make(bad)
