"""Exact second derivatives through IFT and Neumann (``second_order=True``).

References: 300 explicit iterations differentiated twice by plain autograd; ``gradgradcheck`` (central
differences of the gradient); a float64 dense Hessian of the fixed point built from dense Jacobians; Unrolled
at convergence for a gradient penalty.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradgradcheck
from torch.autograd.functional import hessian, jacobian

import implicitkit as ik
from tests.problems import contraction

X = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)
ADJOINT = ik.Anderson(tol=1e-13, max_iter=100, stop_mode="abs")
FORWARD = ik.FixedPointIteration(tol=1e-14, max_iter=400, stop_mode="abs")


def explicit_fixed_point(a, b, steps=300):
    z = torch.zeros_like(X)
    for _ in range(steps):
        z = a * torch.tanh(b * z) + X
    return z


def scalar_solve(gradient):
    def solve(a, b):
        f = lambda z: a * torch.tanh(b * z) + X  # noqa: E731
        return ik.fixed_point(f, torch.zeros_like(X), solver=FORWARD, gradient=gradient).value

    return solve


def mixed_second_derivative(solve, loss=torch.sum) -> float:
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    (da,) = torch.autograd.grad(loss(solve(a, b)), a, create_graph=True)
    (dab,) = torch.autograd.grad(da, b)
    return dab.item()


@pytest.mark.parametrize("loss", [torch.sum, lambda z: (z**3).sum()], ids=["sum", "cubic"])
def test_ift_mixed_second_derivative_matches_explicit_iterations(loss):
    want = mixed_second_derivative(explicit_fixed_point, loss)
    got = mixed_second_derivative(scalar_solve(ik.IFT(ADJOINT, second_order=True)), loss)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-14)
    if loss is torch.sum:
        assert got == pytest.approx(-0.00262, abs=5e-6)


def test_first_order_is_unchanged_by_second_order():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(scalar_solve(ik.IFT(ADJOINT))(a, b).sum(), (a, b))
    twice = torch.autograd.grad(scalar_solve(ik.IFT(ADJOINT, second_order=True))(a, b).sum(), (a, b))
    torch.testing.assert_close(twice, plain, atol=1e-14, rtol=0)


def tanh_cell_problem():
    gen = torch.Generator().manual_seed(0)
    w = contraction(3, 0.5, gen).requires_grad_()
    u = torch.randn(3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    return w, u, x


def cell_solve(w, u, x, gradient):
    f = lambda z: torch.tanh(z @ w.T + x @ u.T)  # noqa: E731
    return ik.fixed_point(f, torch.zeros(2, 3, dtype=torch.float64), solver=FORWARD, gradient=gradient).value


def test_gradgradcheck_of_ift():
    def fn(w, u, x):
        return cell_solve(w, u, x, ik.IFT(ADJOINT, second_order=True))

    assert gradgradcheck(fn, tanh_cell_problem(), atol=1e-6, rtol=1e-5)


def test_hessian_vector_product_matches_dense_hessian():
    w, u, x = tanh_cell_problem()
    x0 = x.detach()
    v = torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def loss(z):
        return (z**2).sum() + z[:, 0].sin().sum()

    xr = x0.clone().requires_grad_()
    (gx,) = torch.autograd.grad(
        loss(cell_solve(w, u, xr, ik.IFT(ADJOINT, second_order=True))), xr, create_graph=True
    )
    (hvp,) = torch.autograd.grad(gx, xr, v)

    # dense reference: z*(x) by 300 iterations is exact to rounding; its Hessian by float64 autograd
    f = lambda z, y: torch.tanh(z @ w.detach().T + y @ u.detach().T)  # noqa: E731

    def loss_of_x(y):
        z = torch.zeros(2, 3, dtype=torch.float64)
        for _ in range(300):
            z = f(z, y)
        return loss(z)

    want = (hessian(loss_of_x, x0).reshape(4, 4) @ v.reshape(-1)).reshape(2, 2)
    torch.testing.assert_close(hvp, want, atol=1e-10, rtol=0)


def test_gradient_penalty_matches_unrolled_at_convergence():
    w, u, x = tanh_cell_problem()

    def penalty_grads(gradient, solver):
        f = lambda z: torch.tanh(z @ w.T + x @ u.T)  # noqa: E731
        z = ik.fixed_point(f, torch.zeros(2, 3, dtype=torch.float64), solver=solver, gradient=gradient).value
        (gx,) = torch.autograd.grad(z.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (w, u))

    got = penalty_grads(ik.IFT(ADJOINT, second_order=True), FORWARD)
    want = penalty_grads(ik.Unrolled(), ik.FixedPointIteration(tol=None, max_iter=200))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_neumann_second_order_is_its_own_gradients_derivative():
    """Neumann(k): d/db of ``sum_i P(J_i) tanh(b z_i)`` with ``z_i'`` = ``P(J_i) df/db``, written out densely."""
    k = 3
    got = mixed_second_derivative(scalar_solve(ik.Neumann(k, second_order=True)))
    a, b = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    z = explicit_fixed_point(a, b).squeeze(1)

    def P(j):
        return sum(j**t for t in range(k + 1))

    def grad_a(b_, z_):  # Neumann's gradient of sum z* with respect to a, at (b, z)
        return (P(a * b_ / torch.cosh(b_ * z_) ** 2) * torch.tanh(b_ * z_)).sum()

    d_db, d_dz = jacobian(grad_a, (b, z))
    z_prime = P(a * b / torch.cosh(b * z) ** 2) * a * z / torch.cosh(b * z) ** 2  # P(J) df/db
    assert got == pytest.approx((d_db + d_dz @ z_prime).item(), rel=1e-10, abs=1e-14)
    long = mixed_second_derivative(scalar_solve(ik.Neumann(200, second_order=True)))
    assert long == pytest.approx(mixed_second_derivative(explicit_fixed_point), rel=1e-9)


def test_default_estimators_still_refuse_and_name_the_switch():
    with pytest.raises(RuntimeError, match=r"refused.*IFT\(second_order=True\)"):
        mixed_second_derivative(scalar_solve(ik.IFT(ADJOINT)))


def test_an_adjoint_that_does_not_converge_refuses_the_second_derivative():
    short = ik.IFT(ik.FixedPointIteration(tol=1e-14, max_iter=2), on_failure="report", second_order=True)
    with pytest.raises(ik.FixedPointError, match="second derivative through IFT needs every adjoint solve"):
        mixed_second_derivative(scalar_solve(short))


def test_third_derivatives_are_refused():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    z = scalar_solve(ik.IFT(ADJOINT, second_order=True))(a, b)
    (da,) = torch.autograd.grad(z.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="exact second derivatives, not third"):
        torch.autograd.grad(da, b, create_graph=True)


@pytest.mark.parametrize(
    "adjoint_solver",
    [ik.GMRES(tol=1e-13, max_iter=50), ik.DirectSolve(tol=1e-10), ik.CG(tol=1e-13, max_iter=50)],
    ids=repr,
)
def test_second_order_with_linear_solver_adjoints(adjoint_solver):
    got = mixed_second_derivative(scalar_solve(ik.IFT(adjoint_solver, second_order=True)))
    assert got == pytest.approx(mixed_second_derivative(explicit_fixed_point), rel=1e-10, abs=1e-14)


def test_deq_module_gradient_penalty_reaches_its_parameters():
    w, u, x = tanh_cell_problem()

    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.u = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(u.detach().clone())

        def forward(self, z, x):
            return torch.tanh(z @ self.w.T + x @ self.u.T)

    def penalty_grads(gradient, solver):
        cell = Cell()
        deq = ik.DEQ(cell, solver=solver, gradient=gradient)
        z = deq(torch.zeros(2, 3, dtype=torch.float64), x).value
        (gx,) = torch.autograd.grad(z.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (cell.w, cell.u))

    got = penalty_grads(ik.IFT(ADJOINT, second_order=True), FORWARD)
    want = penalty_grads(ik.Unrolled(), ik.FixedPointIteration(tol=None, max_iter=200))
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
