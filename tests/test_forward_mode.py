"""Forward-mode AD through a solve (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``).

References: the tangent of ``z* = f(z*, x)`` along ``v`` solves ``(I - J) t = (df/dx) v``, computed here as a
float64 dense solve of ``I - J`` built with ``torch.autograd.functional.jacobian``; the polynomial estimators'
tangents are their polynomials in that same dense ``J``; Unrolled is checked against central finite
differences of the same fixed-count solve.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd.functional import jacobian
from torch.func import jacfwd, jvp

import implicitkit as ik
from tests.problems import contraction

B, D, N = 2, 3, 2  # batch, state, input features
TIGHT = ik.Anderson(tol=1e-13, max_iter=200, stop_mode="abs")


@pytest.fixture
def problem():
    gen = torch.Generator().manual_seed(0)
    w = contraction(D, 0.6, gen)
    u = torch.randn(D, N, generator=gen, dtype=torch.float64)
    x = torch.randn(B, N, generator=gen, dtype=torch.float64)
    v = torch.randn(B, N, generator=gen, dtype=torch.float64)
    return w, u, x, v


def cell(w, u):
    return lambda z, x: torch.tanh(z @ w.T + x @ u.T)


def solve(w, u, gradient, solver=TIGHT):
    f = cell(w, u)
    return lambda x: (
        ik.fixed_point(
            lambda z: f(z, x), torch.zeros(B, D, dtype=x.dtype), solver=solver, gradient=gradient
        ).value
    )


def dense_parts(w, u, x, v):
    """``z*``, the dense ``J`` over the flat batch ``[B D, B D]`` and ``b = (df/dx) v`` (flat) at ``z*``."""
    f = cell(w, u)
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(300):
        z = f(z, x)
    J = jacobian(lambda s: f(s, x), z).reshape(B * D, B * D)
    _, b = torch.autograd.functional.jvp(lambda y: f(z, y), x, v)
    return z, J, b.reshape(-1)


def dense_tangent(w, u, x, v):
    _, J, b = dense_parts(w, u, x, v)
    return torch.linalg.solve(torch.eye(B * D, dtype=torch.float64) - J, b).reshape(B, D)


@pytest.mark.parametrize(
    "gradient", [ik.IFT(TIGHT), ik.IFT(ik.GMRES(tol=1e-13, max_iter=50)), ik.Neumann(80)], ids=repr
)
def test_jvp_matches_dense_solve(problem, gradient):
    w, u, x, v = problem
    _, got = jvp(solve(w, u, gradient), (x,), (v,))
    torch.testing.assert_close(got, dense_tangent(w, u, x, v), atol=1e-10, rtol=0)


@pytest.mark.parametrize("gradient", [ik.IFT(TIGHT), ik.Neumann(80)], ids=repr)
def test_dual_tensors_match_dense_solve_and_parameters_carry_tangents(problem, gradient):
    w, u, x, v = problem
    dw = torch.randn(D, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with fwAD.dual_level():
        out = solve(fwAD.make_dual(w, dw), u, gradient)(fwAD.make_dual(x, v))
        got = fwAD.unpack_dual(out).tangent
    eps = 1e-6  # central differences of the exact fixed point along (dw, v)
    plus = solve(w + eps * dw, u, ik.IFT(TIGHT))(x + eps * v)
    minus = solve(w - eps * dw, u, ik.IFT(TIGHT))(x - eps * v)
    torch.testing.assert_close(got, (plus - minus) / (2 * eps), atol=1e-8, rtol=0)


def test_jacfwd_matches_dense_jacobian(problem):
    w, u, x, _ = problem
    _, J, _ = dense_parts(w, u, x, torch.zeros_like(x))
    z = solve(w, u, ik.IFT(TIGHT))(x)
    f = cell(w, u)
    dfdx = jacobian(lambda y: f(z, y), x).reshape(B * D, B * N)
    want = torch.linalg.solve(torch.eye(B * D, dtype=torch.float64) - J, dfdx).reshape(B, D, B, N)
    for gradient in (ik.Neumann(80), ik.Unrolled()):
        solver = ik.FixedPointIteration(tol=1e-14, max_iter=300, stop_mode="abs")
        torch.testing.assert_close(jacfwd(solve(w, u, gradient, solver))(x), want, atol=1e-10, rtol=0)


def test_ift_under_jacfwd_is_refused_with_the_alternatives(problem):
    w, u, x, _ = problem
    with pytest.raises(RuntimeError, match=r"IFT cannot solve for the tangent under torch.func.vmap.*jvp"):
        jacfwd(solve(w, u, ik.IFT(TIGHT)))(x)


@pytest.mark.parametrize(
    "gradient, polynomial",
    [
        (ik.JFB(), lambda J: torch.eye(len(J), dtype=J.dtype)),
        (ik.Neumann(3), lambda J: sum(torch.linalg.matrix_power(J, t) for t in range(4))),
        (ik.RAG(2), lambda J: torch.eye(len(J), dtype=J.dtype) + J),
        (
            ik.Phantom(k=3, tau=0.5),
            lambda J: (
                0.5
                * sum(
                    torch.linalg.matrix_power(0.5 * J + 0.5 * torch.eye(len(J), dtype=J.dtype), t)
                    for t in range(3)
                )
            ),
        ),
    ],
    ids=lambda p: repr(p) if isinstance(p, ik.GradientEstimator) else "",
)
def test_polynomial_estimators_give_their_own_surrogates_tangent(problem, gradient, polynomial):
    w, u, x, v = problem
    _, J, b = dense_parts(w, u, x, v)
    _, got = jvp(solve(w, u, gradient), (x,), (v,))
    torch.testing.assert_close(got, (polynomial(J) @ b).reshape(B, D), atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "solver", [ik.FixedPointIteration(tol=None, max_iter=12), ik.Anderson(tol=None, max_iter=12)], ids=repr
)
def test_unrolled_tangent_is_exact_for_the_steps_taken(problem, solver):
    w, u, x, v = problem
    run = solve(w, u, ik.Unrolled(), solver)
    _, got = jvp(run, (x,), (v,))
    eps = 1e-6
    torch.testing.assert_close(got, (run(x + eps * v) - run(x - eps * v)) / (2 * eps), atol=1e-8, rtol=0)


def test_tangent_solve_is_recorded_like_the_adjoint(problem):
    w, u, x, v = problem
    f = cell(w, u)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, v)
        sol = ik.fixed_point(
            lambda z: f(z, xd), torch.zeros(B, D, dtype=x.dtype), solver=TIGHT, gradient=ik.IFT(TIGHT)
        )
        _ = sol.value
    (stats,) = sol.backward_stats
    assert stats.solver.startswith("IFT tangent") and bool(stats.converged.all())
    assert stats.nstep.shape == (B,)


def test_deq_module_forward_mode(problem):
    w, u, x, v = problem

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.u = torch.nn.Parameter(w.clone()), torch.nn.Parameter(u.clone())

        def forward(self, z, x):
            return cell(self.w, self.u)(z, x)

    deq = ik.DEQ(Cell(), solver=TIGHT, gradient=ik.IFT(TIGHT))
    _, got = jvp(lambda y: deq(torch.zeros(B, D, dtype=torch.float64), y).value, (x,), (v,))
    torch.testing.assert_close(got, dense_tangent(w, u, x, v), atol=1e-10, rtol=0)
