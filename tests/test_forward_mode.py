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
    "gradient",
    [
        ik.IFT(TIGHT),
        ik.IFT(ik.GMRES(tol=1e-13, max_iter=50)),
        ik.IFT(ik.DirectSolve(tol=1e-10)),
        ik.Neumann(80),
    ],
    ids=repr,
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
    z, got = jvp(lambda y: deq(torch.zeros(B, D, dtype=torch.float64), y).value, (x,), (v,))
    torch.testing.assert_close(got, dense_tangent(w, u, x, v), atol=1e-10, rtol=0)
    z.square().sum().backward()  # the value keeps its implicit gradient to the module's parameters
    torch.testing.assert_close(
        deq.cell.w.grad, unrolled_gradient(w.requires_grad_(), u, x), atol=1e-10, rtol=0
    )


def test_structured_state_tangent_matches_the_flat_one(problem):
    w, u, x, v = problem
    f = cell(w, u)

    def split(x):  # the same map on a (first column, other columns) tuple state
        def g(state):
            z = f(torch.cat(state, dim=1), x)
            return z[:, :1], z[:, 1:]

        zeros = torch.zeros(B, D, dtype=x.dtype)
        a, b = ik.fixed_point(g, (zeros[:, :1], zeros[:, 1:]), solver=TIGHT, gradient=ik.IFT(TIGHT)).value
        return torch.cat([a, b], dim=1)

    _, got = jvp(split, (x,), (v,))
    torch.testing.assert_close(got, dense_tangent(w, u, x, v), atol=1e-10, rtol=0)


def test_reverse_mode_through_an_ift_tangent_is_refused(problem):
    w, u, x, v = problem
    w = w.clone().requires_grad_()
    with fwAD.dual_level():
        z = solve(w, u, ik.IFT(TIGHT))(fwAD.make_dual(x, v))
        primal, tangent = fwAD.unpack_dual(z)
        with pytest.raises(RuntimeError, match=r"through the tangent of a fixed point .* not supported"):
            (primal.sum() + tangent.sum()).backward()


def test_reversible_refuses_forward_mode_with_the_alternatives(problem):
    w, u, x, v = problem
    picard = ik.FixedPointIteration(tol=1e-12, max_iter=200)
    with pytest.raises(RuntimeError, match=r"Reversible does not support forward-mode.*IFT"):
        jvp(solve(w, u, ik.Reversible(), picard), (x,), (v,))
    assert solve(w, u, ik.Reversible(), picard)(x).shape == (B, D)  # outside forward mode it still runs


@pytest.mark.parametrize(
    "gradient", [ik.IFT(TIGHT), ik.IFT(TIGHT, second_order=True), ik.Neumann(5)], ids=repr
)
def test_forward_over_reverse_through_an_adjoint_is_refused(problem, gradient):
    """A gradient taken inside a dual level would carry a wrong tangent (central differences disagree)."""
    w, u, x, v = problem
    w = w.clone().requires_grad_()
    with fwAD.dual_level():
        z = solve(w, u, gradient)(fwAD.make_dual(x, v))
        with pytest.raises(RuntimeError, match=r"forward over reverse.*IFT\(second_order=True\)"):
            torch.autograd.grad(fwAD.unpack_dual(z).primal.square().sum(), w)


def unrolled_gradient(w, u, x):
    """``d sum(z*^2) / dw`` by plain autograd through 300 steps of the contraction (converged in float64)."""
    f, z = cell(w, u), torch.zeros(B, D, dtype=torch.float64)
    for _ in range(300):
        z = f(z, x)
    return torch.autograd.grad(z.square().sum(), w)[0]


@pytest.mark.parametrize(
    "gradient", [ik.IFT(TIGHT), ik.IFT(TIGHT, second_order=True), ik.Neumann(80)], ids=repr
)
def test_the_value_jvp_returns_keeps_its_implicit_gradient(problem, gradient):
    """A loss on the value is back-propagated through the solve after the transform (it once had no graph)."""
    w, u, x, v = problem
    w = w.clone().requires_grad_()
    z, _ = jvp(solve(w, u, gradient), (x,), (v,))
    (got,) = torch.autograd.grad(z.square().sum(), w)
    torch.testing.assert_close(got, unrolled_gradient(w, u, x), atol=1e-10, rtol=0)


def test_the_value_jacfwd_returns_as_aux_keeps_its_implicit_gradient(problem):
    w, u, x, _ = problem
    w = w.clone().requires_grad_()
    polynomial = solve(w, u, ik.Neumann(80))
    _, z = jacfwd(lambda y: (lambda z: (z, z))(polynomial(y)), has_aux=True)(x)
    (got,) = torch.autograd.grad(z.square().sum(), w)
    torch.testing.assert_close(got, unrolled_gradient(w, u, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("gradient", [ik.IFT(TIGHT), ik.Neumann(80)], ids=repr)
def test_reverse_mode_through_a_tangent_from_jvp_is_refused(problem, gradient):
    w, u, x, v = problem
    w = w.clone().requires_grad_()
    z, tangent = jvp(solve(w, u, gradient), (x,), (v,))
    with pytest.raises(RuntimeError, match=r"through the tangent of a fixed point .* not supported"):
        (z.sum() + tangent.sum()).backward()


def test_second_derivatives_of_a_value_from_jvp_are_refused(problem):
    w, u, x, v = problem
    w = w.clone().requires_grad_()
    z, _ = jvp(solve(w, u, ik.IFT(TIGHT, second_order=True)), (x,), (v,))
    (g,) = torch.autograd.grad(z.square().sum(), w, retain_graph=True)
    torch.testing.assert_close(g, unrolled_gradient(w, u, x), atol=1e-10, rtol=0)  # first order: exact
    with pytest.raises(RuntimeError, match=r"second derivatives of a value computed inside torch.func.jvp"):
        torch.autograd.grad(z.square().sum(), w, create_graph=True)


@pytest.mark.parametrize(
    "gradient", [ik.IFT(TIGHT), ik.IFT(TIGHT, second_order=True), ik.Neumann(5)], ids=repr
)
@pytest.mark.parametrize("transform", [torch.func.grad, torch.func.jacrev], ids=lambda t: t.__name__)
def test_adjoints_refuse_functorchs_reverse_mode_with_the_alternatives(problem, gradient, transform):
    w, u, x, _ = problem
    with pytest.raises(RuntimeError, match=r"cannot run under torch.func.grad.*loss.backward\(\).*JFB"):
        transform(lambda w: solve(w, u, gradient)(x).sum())(w)


@pytest.mark.parametrize("transform", [torch.func.grad, torch.func.jacrev], ids=lambda t: t.__name__)
def test_reversible_refuses_functorchs_reverse_mode_with_the_alternatives(problem, transform):
    # It failed inside its closure-input probe with PyTorch's requires_grad_ error.
    w, u, x, _ = problem
    picard = ik.FixedPointIteration(tol=1e-12, max_iter=100)
    with pytest.raises(
        RuntimeError, match=r"Reversible cannot run under torch.func.grad.*loss.backward\(\).*JFB"
    ):
        transform(lambda w: solve(w, u, ik.Reversible(0.8), picard)(x).sum())(w)


@pytest.mark.parametrize("gradient", [ik.JFB(), ik.Phantom(k=3), ik.RAG(2), ik.Unrolled()], ids=repr)
def test_plain_autograd_estimators_run_under_functorchs_grad(problem, gradient):
    """Their graphs are ordinary autograd: ``torch.func.grad`` gives what ``torch.autograd.grad`` does."""
    w, u, x, _ = problem
    picard = ik.FixedPointIteration(tol=1e-12, max_iter=100)
    loss = lambda w: solve(w, u, gradient, picard)(x).square().sum()  # noqa: E731
    leaf = w.clone().requires_grad_()
    (want,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(loss)(w), want, atol=1e-12, rtol=0)


def test_a_dict_state_returned_in_another_key_order_gets_each_leaf_its_own_tangent(problem):
    """The tangent's pieces were read in the order the cell returned its keys and put back in the state's:
    with ``b`` first, ``a``'s tangent went to ``b`` (whose exact tangent is zero) and the other way round."""
    w, u, x, v = problem
    f = cell(w, u)

    def swapped(s, x):  # "b" does not depend on x: its fixed point is a constant
        return {"b": 0.5 * torch.sin(s["b"]) + 0.1, "a": f(s["a"], x)}

    def solve_dict(gradient):
        start = {"a": torch.zeros(B, D, dtype=torch.float64), "b": torch.zeros(B, D, dtype=torch.float64)}
        return lambda x: ik.fixed_point(lambda s: swapped(s, x), start, solver=TIGHT, gradient=gradient).value

    want = dense_tangent(w, u, x, v)
    for gradient in (ik.IFT(TIGHT), ik.Neumann(60), ik.IFT(TIGHT, second_order=True)):
        _, t = jvp(solve_dict(gradient), (x,), (v,))
        assert torch.allclose(t["a"], want, atol=1e-9), gradient
        assert t["b"].abs().max() == 0, gradient

    # The value jvp returns keeps IFT's gradient, per leaf: d(sum a*)/dx against the dense reference.
    xr = x.clone().requires_grad_()
    value, _ = jvp(solve_dict(ik.IFT(TIGHT)), (xr,), (v,))
    (grad,) = torch.autograd.grad(value["a"].sum(), xr)
    z, J, _ = dense_parts(w, u, x, v)
    dfdx = jacobian(lambda y: f(z, y), x).reshape(B * D, B * N)
    expected = torch.ones(B * D, dtype=torch.float64) @ torch.linalg.solve(
        torch.eye(B * D, dtype=torch.float64) - J, dfdx
    )
    assert torch.allclose(grad.reshape(-1), expected, atol=1e-9)


@pytest.mark.parametrize(
    "gradient", [ik.IFT(TIGHT), ik.IFT(TIGHT, second_order=True), ik.IFT(ik.GMRES(tol=1e-12)), ik.Neumann(20)]
)
def test_nested_forward_mode_is_refused_where_the_outer_tangent_would_be_lost(problem, gradient):
    """The tangent is attached after the solve at the innermost level only: a jvp around another jvp (or
    jacfwd of jacfwd) got zeros for every outer tangent, first order included."""
    w, u, x, v = problem
    inner = lambda y: jvp(solve(w, u, gradient), (y,), (v,))[1]  # noqa: E731
    with pytest.raises(RuntimeError, match="nested forward mode"):
        jvp(inner, (x,), (v,))


def test_nested_forward_mode_through_unrolled_is_the_second_derivative(problem):
    """Unrolled's graph is plain autograd: jvp of jvp is the second directional derivative of its steps,
    checked against central differences of the first derivative."""
    w, u, x, v = problem
    steps = ik.FixedPointIteration(tol=None, max_iter=60)
    first = lambda y: jvp(solve(w, u, ik.Unrolled(), steps), (y,), (v,))[1]  # noqa: E731
    _, second = jvp(first, (x,), (v,))
    eps = 1e-5
    assert torch.allclose(second, (first(x + eps * v) - first(x - eps * v)) / (2 * eps), atol=1e-8)
