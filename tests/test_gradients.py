"""Every gradient estimator against its closed form, and IFT's handling of a failed adjoint solve.

On the linear map ``f(z) = A z + B x`` each estimator replaces ``(I - A)^-1`` by a known matrix polynomial
``P(A)``, so with ``L = sum(c * z)`` the gradients are exactly ``dL/dx = c P B``, ``dL/dB = (c P)^T x`` and
``dL/dA = (c P)^T z*``, computed here with dense float64 algebra, independently of the library.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import contraction

import implicitkit as ik

TIGHT = dict(tol=1e-13, max_iter=400, stop_mode="abs")
D, DX, N = 5, 3, 4


def name(obj) -> str:
    return type(obj).__name__


def tight_ift() -> ik.IFT:
    return ik.IFT(ik.Anderson(**TIGHT), on_failure="raise")


def linear_problem(seed: int = 0, rate: float = 0.6):
    gen = torch.Generator().manual_seed(seed)
    a = contraction(D, rate, gen)
    b = torch.randn(D, DX, generator=gen, dtype=torch.float64)
    x = torch.randn(N, DX, generator=gen, dtype=torch.float64)
    c = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return a, b, x, c


def estimator_grads(estimator, a, b, x, c, solver=None):
    """``dL/dx, dL/dA, dL/dB`` under ``estimator`` for ``L = sum(c * z*)``, and the solution."""
    a, b, x = (t.clone().requires_grad_() for t in (a, b, x))
    sol = ik.fixed_point(
        lambda z: z @ a.T + x @ b.T,
        torch.zeros(N, D, dtype=torch.float64),
        solver=solver or ik.Anderson(**TIGHT),
        gradient=estimator,
    )
    (sol.value * c).sum().backward()
    return x.grad, a.grad, b.grad, sol


def closed_form(poly, a, b, x, c):
    """Dense gradients for ``u = c P`` at the exact fixed point ``z* = (I - A)^-1 B x``."""
    eye = torch.eye(D, dtype=torch.float64)
    z_star = torch.linalg.solve(eye - a, b @ x.T).T
    u = c @ poly
    return u @ b, u.T @ z_star, u.T @ x


def matrix_power_sum(m, powers):
    eye = torch.eye(D, dtype=torch.float64)
    return sum((torch.linalg.matrix_power(m, t) for t in powers), torch.zeros_like(eye))


def assert_grads_equal(got, want, atol=1e-10):
    for name, g, w in zip(("x", "A", "B"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=atol, rtol=0, msg=lambda m, name=name: f"dL/d{name}: {m}")


def test_ift_is_the_inverse():
    a, b, x, c = linear_problem()
    poly = torch.linalg.inv(torch.eye(D, dtype=torch.float64) - a)
    gx, ga, gb, _ = estimator_grads(tight_ift(), a, b, x, c)
    assert_grads_equal((gx, ga, gb), closed_form(poly, a, b, x, c))


def test_jfb_is_the_identity():
    a, b, x, c = linear_problem()
    gx, ga, gb, _ = estimator_grads(ik.JFB(), a, b, x, c)
    want = closed_form(torch.eye(D, dtype=torch.float64), a, b, x, c)
    assert_grads_equal((gx, ga, gb), want)
    torch.testing.assert_close(gx, c @ b, atol=1e-12, rtol=0)  # the form: g B


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 8), tau=st.floats(0.05, 1.0), seed=st.integers(0, 3))
def test_phantom_closed_form(k, tau, seed):
    a, b, x, c = linear_problem(seed)
    m = tau * a + (1.0 - tau) * torch.eye(D, dtype=torch.float64)
    poly = tau * matrix_power_sum(m, range(k))
    gx, ga, gb, _ = estimator_grads(ik.Phantom(k=k, tau=tau), a, b, x, c)
    assert_grads_equal((gx, ga, gb), closed_form(poly, a, b, x, c))


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 5), seed=st.integers(0, 3))
def test_rag_closed_form(k, seed):
    a, b, x, c = linear_problem(seed)
    gx, ga, gb, _ = estimator_grads(ik.RAG(k=k), a, b, x, c)
    assert_grads_equal((gx, ga, gb), closed_form(matrix_power_sum(a, range(k)), a, b, x, c))


def test_rag2_is_identity_plus_a():
    a, b, x, c = linear_problem()
    gx, _, _, _ = estimator_grads(ik.RAG(), a, b, x, c)
    torch.testing.assert_close(gx, c @ (torch.eye(D, dtype=torch.float64) + a) @ b, atol=1e-10, rtol=0)


@settings(max_examples=10, deadline=None)
@given(k=st.integers(0, 8), seed=st.integers(0, 3))
def test_neumann_closed_form(k, seed):
    a, b, x, c = linear_problem(seed)
    gx, ga, gb, _ = estimator_grads(ik.Neumann(k=k), a, b, x, c)
    assert_grads_equal((gx, ga, gb), closed_form(matrix_power_sum(a, range(k + 1)), a, b, x, c))


def test_jfb_equals_phantom_one_step():
    a, b, x, c = linear_problem()
    jfb = estimator_grads(ik.JFB(), a, b, x, c)[:3]
    phantom = estimator_grads(ik.Phantom(k=1, tau=1.0), a, b, x, c)[:3]
    assert_grads_equal(jfb, phantom, atol=0)


def test_unrolled_is_exact_for_the_steps_taken():
    """Plain iteration from 0 for n steps returns sum_{t<n} A^t B x, so its gradient is c sum_{t<n} A^t B."""
    a, b, x, c = linear_problem()
    solver = ik.FixedPointIteration(tol=1e-5, max_iter=200, stop_mode="abs")
    gx, _, _, sol = estimator_grads(ik.Unrolled(), a, b, x, c, solver=solver)
    nstep = sol.stats.nstep
    assert len(set(nstep.tolist())) > 1, "samples should stop at different steps for this check to bite"
    for i in range(N):
        want = c[i] @ matrix_power_sum(a, range(int(nstep[i]))) @ b
        torch.testing.assert_close(gx[i], want, atol=1e-12, rtol=0)


# -- nonlinear maps -------------------------------------------------------------------------------------


def tanh_problem(seed=0, rate=0.8):
    gen = torch.Generator().manual_seed(seed)
    w = contraction(D, rate, gen)
    u = torch.randn(D, DX, generator=gen, dtype=torch.float64)
    x = torch.randn(N, DX, generator=gen, dtype=torch.float64)
    c = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return w, u, x, c


def tanh_grads(estimator, w, u, x, c, solver=None):
    w, u = w.clone().requires_grad_(), u.clone().requires_grad_()
    sol = ik.fixed_point(
        lambda z: torch.tanh(z @ w.T + x @ u.T),
        torch.zeros(N, D, dtype=torch.float64),
        solver=solver or ik.Anderson(**TIGHT),
        gradient=estimator,
    )
    (sol.value * c).sum().backward()
    return torch.cat([w.grad.flatten(), u.grad.flatten()])


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_phantom_tends_to_ift_on_a_nonlinear_map():
    w, u, x, c = tanh_problem()
    exact = tanh_grads(tight_ift(), w, u, x, c)
    errors = [rel_err(tanh_grads(ik.Phantom(k=k, tau=0.5), w, u, x, c), exact) for k in (1, 5, 20, 40, 200)]
    assert all(e2 < e1 or e2 < 1e-13 for e1, e2 in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-10, errors


@pytest.mark.parametrize("solver", [ik.FixedPointIteration(**TIGHT), ik.Anderson(**TIGHT)], ids=name)
def test_unrolled_at_convergence_equals_ift(solver):
    w, u, x, c = tanh_problem()
    exact = tanh_grads(tight_ift(), w, u, x, c)
    assert rel_err(tanh_grads(ik.Unrolled(), w, u, x, c, solver=solver), exact) < 1e-9


def test_jfb_is_exact_when_the_jacobian_vanishes():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(D, DX, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, DX, generator=gen, dtype=torch.float64)

    def grad(estimator):
        sol = ik.fixed_point(
            lambda z: torch.tanh(x @ u.T) + 0.0 * z,
            torch.zeros(N, D, dtype=torch.float64),
            gradient=estimator,
        )
        return torch.autograd.grad(sol.value.square().sum(), u)[0]

    torch.testing.assert_close(grad(ik.JFB()), grad(tight_ift()), atol=1e-12, rtol=0)


@pytest.mark.parametrize("estimator", [ik.IFT(ik.Anderson(**TIGHT)), ik.Unrolled()], ids=name)
def test_gradcheck_exact_estimators(estimator):
    w, u, x, _ = tanh_problem(rate=0.5)
    x = x[:2].clone().requires_grad_()

    def solve(x):
        return ik.fixed_point(
            lambda z: torch.tanh(z @ w.T + x @ u.T),
            torch.zeros(2, D, dtype=torch.float64),
            solver=ik.Anderson(**TIGHT),
            gradient=estimator,
        ).value

    assert torch.autograd.gradcheck(solve, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("estimator", [tight_ift(), ik.Neumann(3), ik.JFB(), ik.RAG(2)], ids=name)
def test_structured_state_with_a_detached_leaf(estimator):
    """A leaf of f(z) without a graph (DEQDet detaches its box) contributes nothing and breaks nothing."""
    a, b, x, c = linear_problem()
    x = x.clone().requires_grad_()
    const = torch.ones(N, 2, dtype=torch.float64)

    def f(state):
        z, box = state
        return z @ a.T + x @ b.T, box.detach() * 0.5 + const

    sol = ik.fixed_point(
        f,
        (torch.zeros(N, D, dtype=torch.float64), torch.zeros(N, 2, dtype=torch.float64)),
        solver=ik.Anderson(**TIGHT),
        gradient=estimator,
    )
    z, box = sol.value
    ((z * c).sum() + box.sum()).backward()
    eye = torch.eye(D, dtype=torch.float64)
    poly = {
        "IFT": torch.linalg.inv(eye - a),
        "Neumann": matrix_power_sum(a, range(4)),
        "JFB": eye,
        "RAG": eye + a,
    }[type(estimator).__name__]
    torch.testing.assert_close(x.grad, c @ poly @ b, atol=1e-10, rtol=0)


# -- IFT's fallback ---------------------------------------------------------------------------------------


def scaled_problem():
    """Per-sample Jacobians ``s_b A``; sample 0 has ``J = 0``, so its adjoint converges in one step."""
    a, b, x, c = linear_problem()
    s = torch.tensor([0.0, 1.0, 0.8, 0.5], dtype=torch.float64)
    return a, b, x, c, s


def scaled_grad(estimator, a, b, x, c, s):
    x = x.clone().requires_grad_()
    sol = ik.fixed_point(
        lambda z: s[:, None] * (z @ a.T) + x @ b.T,
        torch.zeros(N, D, dtype=torch.float64),
        solver=ik.Anderson(**TIGHT),
        gradient=estimator,
    )
    (sol.value * c).sum().backward()
    return x.grad, sol


def one_step_adjoint() -> ik.FixedPointIteration:
    return ik.FixedPointIteration(tol=1e-12, max_iter=1, stop_mode="abs")


@pytest.mark.parametrize("fallback", [ik.JFB(), ik.Neumann(2)], ids=name)
def test_fallback_replaces_only_failed_samples(fallback):
    a, b, x, c, s = scaled_problem()
    gx, sol = scaled_grad(ik.IFT(one_step_adjoint(), on_failure=fallback), a, b, x, c, s)
    (stats,) = sol.backward_stats
    assert stats.fallback == type(fallback).__name__
    assert stats.fell_back.tolist() == [False, True, True, True]
    assert stats.converged.tolist() == [True, False, False, False]
    eye = torch.eye(D, dtype=torch.float64)
    for i in range(N):
        j = s[i] * a
        poly = eye if isinstance(fallback, ik.JFB) else eye + j + j @ j
        if i == 0:
            poly = torch.linalg.inv(eye - j)  # converged: the exact adjoint
        torch.testing.assert_close(gx[i], c[i] @ poly @ b, atol=1e-12, rtol=0)


def test_no_fallback_when_the_adjoint_converges():
    a, b, x, c, s = scaled_problem()
    _, sol = scaled_grad(ik.IFT(ik.Anderson(**TIGHT), on_failure=ik.JFB()), a, b, x, c, s)
    (stats,) = sol.backward_stats
    assert stats.fallback is None and not stats.fell_back.any()


def test_fallback_raise_names_the_problem():
    a, b, x, c, s = scaled_problem()
    with pytest.raises(
        ik.FixedPointError, match=r"IFT adjoint .*3/4 samples did not reach tol.*IFT\(on_failure=JFB\(\)\)"
    ):
        scaled_grad(ik.IFT(one_step_adjoint(), on_failure="raise"), a, b, x, c, s)


def test_fallback_raise_still_records_the_stats():
    a, b, x, c, s = scaled_problem()
    seen = []
    with pytest.raises(ik.FixedPointError):
        scaled_grad(ik.IFT(one_step_adjoint(), on_failure="raise", callback=seen.append), a, b, x, c, s)
    assert seen and seen[0].fell_back.sum() == 3


def test_fallback_warn_keeps_the_best_iterate():
    a, b, x, c, s = scaled_problem()
    with pytest.warns(RuntimeWarning, match="best adjoint iterate"):
        gx, sol = scaled_grad(ik.IFT(one_step_adjoint(), on_failure="warn"), a, b, x, c, s)
    (stats,) = sol.backward_stats
    assert stats.fallback == "best_iterate" and stats.fell_back.sum() == 3
    # one step of u <- u J + g from u = g gives g (I + J): the best (only) iterate
    eye = torch.eye(D, dtype=torch.float64)
    torch.testing.assert_close(gx[1], c[1] @ (eye + s[1] * a) @ b, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("on_failure", "error"),
    [("ignore", ValueError), (ik.Phantom(), TypeError), (ik.RAG(), TypeError), (3, TypeError)],
)
def test_fallback_must_be_a_polynomial_estimator(on_failure, error):
    with pytest.raises(error, match=r"on_failure|fallback"):
        ik.IFT(on_failure=on_failure)


@pytest.mark.parametrize("k", [0, -1])
def test_bad_arguments_are_rejected(k):
    with pytest.raises(ValueError, match="k >= 1"):
        ik.Phantom(k=k)
    with pytest.raises(ValueError, match="tau"):
        ik.Phantom(tau=1.5)
    with pytest.raises(ValueError, match="k >= 0"):
        ik.Neumann(k=k - 1)


def test_estimators_share_the_protocol():
    w = torch.ones(2, requires_grad=True)
    for estimator in (ik.IFT(), ik.JFB(), ik.Phantom(), ik.RAG(), ik.Neumann(), ik.Unrolled()):
        assert isinstance(estimator, ik.GradientEstimator)
        result = estimator.solve(ik.FixedPointIteration(max_iter=2), lambda z: 0.5 * z * w, torch.ones(1, 2))
        assert result.value.requires_grad is isinstance(
            estimator, ik.Unrolled
        )  # the estimator runs the solve
        assert type(estimator).__name__ in repr(estimator)


@pytest.mark.parametrize("tol", [1e-10, None])
def test_unrolled_through_anderson_without_regularisation_has_the_implicit_gradient(tol):
    """Anderson(lam=0) replaces a singular least-squares system by the plain step: its discarded branch's NaN
    reached Unrolled's gradient (0 * NaN) while the value and the stats looked right."""
    torch.manual_seed(0)
    weight = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64)
    x[0] *= 0.01  # converges before the others: its later systems are singular
    x.requires_grad_()
    f = lambda z: torch.tanh(z @ weight.T + x)  # noqa: E731
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    tight = ik.Anderson(tol=1e-12, max_iter=100)
    ref = torch.autograd.grad(ik.fixed_point(f, z0, solver=tight, gradient=ik.IFT(tight)).value.sum(), x)[0]
    sol = ik.fixed_point(f, z0, solver=ik.Anderson(lam=0.0, tol=tol, max_iter=40), gradient=ik.Unrolled())
    grad = torch.autograd.grad(sol.value.sum(), x)[0]
    torch.testing.assert_close(grad, ref, rtol=0, atol=1e-8)
