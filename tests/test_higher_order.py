"""Second derivatives: exact where the estimator's graph is ordinary autograd, refused through adjoint solves."""

from __future__ import annotations

import pytest
import torch

import implicitkit as ik

X = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)


def explicit_fixed_point(a, b, steps=300):
    """``z = a tanh(b z) + x`` by plain autograd through ``steps`` iterations: the reference."""
    z = torch.zeros_like(X)
    for _ in range(steps):
        z = a * torch.tanh(b * z) + X
    return z


def mixed_second_derivative(solve) -> float:
    """``d2 (sum z*) / (da db)`` at ``a = 0.7``, ``b = 1.3``."""
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    (da,) = torch.autograd.grad(solve(a, b).sum(), a, create_graph=True)
    (dab,) = torch.autograd.grad(da, b)
    return dab.item()


def deq_solve(gradient, solver=None):
    solver = solver or ik.FixedPointIteration(tol=1e-14, max_iter=400, stop_mode="abs")

    def solve(a, b):
        return ik.fixed_point(
            lambda z: a * torch.tanh(b * z) + X, torch.zeros_like(X), solver=solver, gradient=gradient
        ).value

    return solve


def test_reference_second_derivative_is_the_published_value():
    assert mixed_second_derivative(explicit_fixed_point) == pytest.approx(-0.00262, abs=5e-5)


def test_unrolled_second_derivative_is_exact():
    got = mixed_second_derivative(deq_solve(ik.Unrolled(), ik.FixedPointIteration(tol=None, max_iter=300)))
    assert got == pytest.approx(mixed_second_derivative(explicit_fixed_point), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize(
    "gradient", [ik.IFT(ik.Anderson(tol=1e-12, max_iter=100, stop_mode="abs")), ik.Neumann(5)]
)
def test_adjoint_estimators_refuse_second_derivatives(gradient):
    with pytest.raises(RuntimeError, match=r"does not differentiate its own backward.*Unrolled"):
        mixed_second_derivative(deq_solve(gradient))


@pytest.mark.parametrize(
    "gradient",
    [
        ik.IFT(ik.Anderson(tol=1e-12, max_iter=100, stop_mode="abs"), second_order=True),
        ik.Neumann(200, second_order=True),
    ],
)
def test_adjoint_estimators_with_second_order_are_exact(gradient):
    got = mixed_second_derivative(deq_solve(gradient))
    assert got == pytest.approx(mixed_second_derivative(explicit_fixed_point), rel=1e-8, abs=1e-14)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_refused_under_backward_with_create_graph_too():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    z = deq_solve(ik.IFT())(a, torch.tensor(1.3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="refused"):
        z.sum().backward(create_graph=True)


def test_first_order_through_ift_still_matches_the_reference():
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64)
    gradient = ik.IFT(ik.Anderson(tol=1e-13, max_iter=100, stop_mode="abs"))
    (got,) = torch.autograd.grad(deq_solve(gradient)(a, b).sum(), a)
    (want,) = torch.autograd.grad(explicit_fixed_point(a, b).sum(), a)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_gradgradcheck_of_unrolled():
    gen = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    solver = ik.FixedPointIteration(tol=None, max_iter=30)

    def solve(w, x):
        f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
        return ik.fixed_point(f, torch.zeros_like(x), solver=solver, gradient=ik.Unrolled()).value

    assert torch.autograd.gradgradcheck(solve, (w, x), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k, tau", [(1, 1.0), (3, 0.5)])
def test_phantom_second_derivative_is_that_of_its_unrolled_surrogate(k, tau):
    """JFB and Phantom differentiate ``k`` damped steps from the detached ``z*``: so do their second derivatives."""

    def surrogate(a, b):
        z = explicit_fixed_point(a, b).detach()
        for _ in range(k):
            z = (1 - tau) * z + tau * (a * torch.tanh(b * z) + X)
        return z

    got = mixed_second_derivative(deq_solve(ik.Phantom(k=k, tau=tau)))
    assert got == pytest.approx(mixed_second_derivative(surrogate), rel=1e-9, abs=1e-13)
