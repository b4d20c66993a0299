"""Fixed-count solves (``tol=None``), the last iterate, result codes, and norms that do not overflow."""

from __future__ import annotations

import pytest
import torch

import implicitkit as ik

SOLVERS = [ik.FixedPointIteration, ik.Anderson, ik.Broyden]


@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.Unrolled()])
def test_fixed_count_takes_exactly_max_iter_steps_and_last_is_that_iterate(gen, gradient):
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sol = ik.fixed_point(
        lambda z: 0.5 * z + x,
        torch.zeros_like(x),
        solver=ik.FixedPointIteration(tol=None, max_iter=7),
        gradient=gradient,
    )
    z = torch.zeros_like(x)
    for _ in range(7):
        z = 0.5 * z + x
    assert sol.stats.nstep.tolist() == [7] * 5
    assert sol.stats.converged.all() and sol.stats.trace.shape == (7, 5)
    torch.testing.assert_close(sol.last, z, atol=1e-12, rtol=0)
    torch.testing.assert_close(z, 2 * x * (1 - 0.5**7), atol=1e-12, rtol=0)  # the closed form


@pytest.mark.parametrize("solver", SOLVERS)
def test_fixed_count_ignores_convergence(gen, solver):
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    stats = ik.fixed_point(
        lambda z: 0.1 * z + x, torch.zeros_like(x), solver=solver(tol=None, max_iter=25)
    ).stats
    assert stats.nstep.tolist() == [25] * 4 and stats.tol is None
    assert "converged 4/4" in stats.summary()


def test_last_differs_from_best_when_the_iteration_oscillates(gen):
    x = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    sol = ik.fixed_point(
        lambda z: -1.2 * z + x, torch.zeros_like(x), solver=ik.FixedPointIteration(tol=None, max_iter=6)
    )
    assert (sol.stats.residual < sol.stats.trace[-1]).all()  # the residual grows, the best is early
    assert not torch.allclose(sol.value, sol.last)


def test_result_codes_and_messages(gen):
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    x[1, 0] = float("nan")
    stats = ik.fixed_point(
        lambda z: 0.9 * z + x, torch.zeros_like(x), solver=ik.FixedPointIteration(tol=1e-12, max_iter=5)
    ).stats
    assert stats.result.dtype == torch.int8
    assert stats.result.tolist() == [
        ik.Result.max_steps_reached,
        ik.Result.nonfinite,
        ik.Result.max_steps_reached,
    ]
    assert "sample 1 produced NaN or inf" in stats.message(1)
    message = stats.failure_message()
    assert (
        "1/3 samples produced NaN" in message
        and "2/3 samples did not reach tol within max_iter (tol=1e-12 rel, max_iter=5" in message
    )


def test_fixed_count_reports_nonfinite(gen):
    x = torch.randn(2, 3, generator=gen)
    x[0, 1] = float("inf")
    stats = ik.fixed_point(
        lambda z: 0.5 * z + x, torch.zeros_like(x), solver=ik.FixedPointIteration(tol=None, max_iter=3)
    ).stats
    assert stats.result.tolist() == [ik.Result.nonfinite, ik.Result.successful]


def test_throw_carries_the_stats(gen):
    x = torch.randn(2, 3, generator=gen)
    with pytest.raises(ik.FixedPointError) as info:
        ik.fixed_point(
            lambda z: 0.99 * z + x,
            torch.zeros_like(x),
            solver=ik.FixedPointIteration(tol=1e-9, max_iter=3, throw=True),
        )
    assert info.value.stats.nstep.tolist() == [3, 3]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("tol", [1e-5, None])
def test_huge_finite_float32_states_are_not_reported_as_nonfinite(solver, tol):
    x = torch.full((2, 64), 1e20)  # squares overflow float32; the values do not
    sol = ik.fixed_point(lambda z: 0.5 * z + x, torch.zeros_like(x), solver=solver(tol=tol, max_iter=60))
    assert not sol.stats.nonfinite.any()
    assert torch.isfinite(sol.stats.residual).all()
    if tol is not None:
        assert sol.stats.converged.all()
    torch.testing.assert_close(sol.value, 2 * x, rtol=1e-4, atol=0)


def test_tol_none_is_validated():
    with pytest.raises(ValueError, match="tolerance"):
        ik.IFT(ik.Anderson(tol=None))
    with pytest.raises(ValueError, match="None for a fixed step count"):
        ik.FixedPointIteration(tol=-1.0)


def test_one_failure_vocabulary_forward_and_backward(gen):
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    slow = dict(tol=1e-12, max_iter=2)
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        ik.fixed_point(
            lambda z: 0.9 * z + x,
            torch.zeros_like(x),
            solver=ik.FixedPointIteration(**slow, on_failure="warn"),
        )
    with pytest.raises(ValueError, match="on_failure must be one of"):
        ik.FixedPointIteration(on_failure="ignore")
    sol = ik.fixed_point(
        lambda z: 0.9 * z + x, torch.zeros_like(x), gradient=ik.IFT(ik.Anderson(**slow), on_failure="report")
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "report" keeps the best adjoint iterate without a warning
        sol.value.sum().backward()
    assert sol.backward_stats[0].fallback == "best_iterate" and sol.backward_stats[0].fell_back.all()
    with pytest.raises(TypeError, match="cannot be IFT's fallback"):
        ik.IFT(on_failure=ik.RAG())


def test_scaled_norm_matches_float64_where_float32_squares_overflow():
    from implicitkit.solvers.loop import _scaled_norm

    x = torch.tensor([[3e20, -4e20, 0.0], [0.0, 0.0, 0.0], [1e-30, 2e-30, 2e-30]])
    want = torch.linalg.vector_norm(x.double(), dim=1).float()
    torch.testing.assert_close(_scaled_norm(x.clone(), inplace=True), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(_scaled_norm(x, inplace=False), want, rtol=1e-6, atol=0)
    assert torch.isinf(torch.linalg.vector_norm(x, dim=1)[0])  # what the plain norm gives


def test_a_long_adaptive_solve_records_every_step_across_its_growing_buffers():
    """``z_{k+1} = a z_k + x`` from 0: the residual after step ``k`` is ``|x| a^k`` exactly, also past the
    rows a solve keeps at first (its buffers double as it goes, so a generous max_iter costs nothing)."""
    a, x = 0.97, torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    solver = ik.FixedPointIteration(tol=1e-6, max_iter=10**6, stop_mode="abs")
    with torch.no_grad():
        sol = ik.fixed_point(lambda z: a * z + x, torch.zeros_like(x), solver=solver)
    steps = torch.arange(1, 1000, dtype=torch.float64)
    want_steps = [int((x[i].abs() * a ** (steps - 1) <= 1e-6).nonzero()[0]) + 1 for i in range(2)]
    assert sol.stats.nstep.tolist() == want_steps and max(want_steps) > 4 * 64
    taken = max(want_steps)
    for i, n in enumerate(want_steps):
        want = x[i].abs() * a ** torch.arange(n, dtype=torch.float64)
        torch.testing.assert_close(sol.stats.trace[:n, i], want, rtol=1e-7, atol=1e-14)  # f(z) - z cancels
        assert (sol.stats.trace[n:taken, i] == sol.stats.residual[i]).all()  # stopped: repeats its best
