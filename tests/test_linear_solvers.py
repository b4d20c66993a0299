"""Linear-solve adjoints: GMRES, CG and DirectSolve against float64 dense solves."""

from __future__ import annotations

import pytest
import torch

import implicitkit as ik
from implicitkit.gradients.ift import jvp_by_double_backward

LINEAR = {
    "GMRES": lambda **kw: ik.GMRES(tol=1e-12, max_iter=200, **kw),
    "CG": lambda **kw: ik.CG(tol=1e-12, max_iter=400, **kw),
    "DirectSolve": lambda **kw: ik.DirectSolve(tol=1e-10, **kw),
}


def batch_of_matrices(batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Well-conditioned nonsymmetric ``[B, D, D]`` matrices ``I + 0.4 R``."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    return torch.eye(dim, dtype=torch.float64) + 0.4 * r


@pytest.mark.parametrize("name", LINEAR)
def test_solution_equals_a_dense_solve(name):
    a = batch_of_matrices(3, 7)
    b = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x, stats = LINEAR[name]().solve(
        lambda v: (a @ v[..., None]).squeeze(-1),
        b,
        apply_transposed=lambda v: (a.mT @ v[..., None]).squeeze(-1),
    )
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert stats.converged.all() and stats.residual.max() <= stats.tol


def test_gmres_stops_each_sample_on_its_own():
    """Sample 0 is the identity (solved by one product); it is frozen while sample 1 goes on."""
    a = batch_of_matrices(2, 12)
    a[0] = torch.eye(12, dtype=torch.float64)
    b = torch.randn(2, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = ik.GMRES(tol=1e-12, max_iter=100)
    x, stats = solver.solve(lambda v: (a @ v[..., None]).squeeze(-1), b)
    assert int(stats.nstep[0]) == 1 < int(stats.nstep[1])
    alone, _ = solver.solve(lambda v: v, b[:1])
    torch.testing.assert_close(x[0], alone[0], rtol=0, atol=1e-14)
    torch.testing.assert_close(x[1], torch.linalg.solve(a[1], b[1]), rtol=1e-9, atol=1e-10)


def test_running_out_of_products_is_reported():
    a = batch_of_matrices(2, 10)
    b = torch.ones(2, 10, dtype=torch.float64)
    _, stats = ik.GMRES(tol=1e-12, max_iter=2).solve(lambda v: (a @ v[..., None]).squeeze(-1), b)
    assert (stats.result == ik.Result.max_steps_reached).all() and (stats.nstep == 2).all()


def test_gmres_flags_a_nonfinite_sample_and_solves_the_others():
    """Sample 0's right-hand side is NaN; sample 1's operator turns NaN at the second product, mid-cycle.

    One cycle holds all 8 products (``restart = max_iter = 8``), so the healthy samples are solved only if
    the cycle still updates them after sample 1 went bad; ``lstsq`` must see no NaN from samples 0 and 1.
    """
    a = batch_of_matrices(4, 8)
    b = torch.randn(4, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    b[0, 0] = float("nan")
    calls = []

    def apply(v):
        calls.append(None)
        out = (a @ v[..., None]).squeeze(-1)
        return torch.cat([out[:1], out[1:2] * float("nan"), out[2:]]) if len(calls) >= 2 else out

    x, stats = ik.GMRES(tol=1e-10, restart=8, max_iter=8).solve(apply, b)
    torch.testing.assert_close(x[2:], torch.linalg.solve(a[2:], b[2:]), rtol=1e-9, atol=1e-10)
    assert stats.result.tolist() == [ik.Result.nonfinite] * 2 + [ik.Result.successful] * 2
    assert stats.nstep[:2].tolist() == [1, 2] and torch.isfinite(x[1:]).all()


def tanh_problem(dim: int = 5, scale: float = 0.6, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    w = (scale * torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5).requires_grad_()
    x = torch.randn(4, dim, generator=gen, dtype=torch.float64).requires_grad_()
    return w, x


def dense_gradients(w, x, z):
    """``dL/dx`` and ``dL/dW`` of ``L = sum(z*)`` with ``z* = tanh(z* W^T + x)``, by dense float64 algebra."""
    s = 1 - z.detach() ** 2  # tanh' at the fixed point
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    jac = s[:, :, None] * w.detach()[None]  # [B, D, D]: J = diag(s) W
    u = torch.linalg.solve((eye - jac).mT, torch.ones_like(z))  # u (I - J) = g, g = 1
    gx = u * s
    gw = torch.einsum("bi,bj->ij", gx, z.detach())
    return gx, gw


@pytest.mark.parametrize("name", LINEAR)
def test_ift_with_a_linear_solver_equals_the_dense_gradient(name):
    w, x = tanh_problem()
    forward = ik.Anderson(tol=1e-13, max_iter=200, on_failure="raise")
    sol = ik.fixed_point(
        lambda z: torch.tanh(z @ w.T + x),
        torch.zeros_like(x.detach()),
        solver=forward,
        gradient=ik.IFT(LINEAR[name](), on_failure="raise"),
    )
    gx, gw = torch.autograd.grad(sol.value.sum(), (x, w))
    want_x, want_w = dense_gradients(w, x, sol.value)
    torch.testing.assert_close(gx, want_x, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(gw, want_w, rtol=1e-8, atol=1e-10)
    (stats,) = sol.backward_stats
    assert stats.solver == f"IFT adjoint ({name})" and stats.converged.all() and not stats.fell_back.any()


def test_ift_with_gmres_gives_finite_gradients_beside_a_nan_sample():
    """A NaN input for sample 0: the other samples' gradients are the dense ones, only sample 0 is flagged."""
    w, x = tanh_problem()
    x = x.detach().clone()
    x[0, 0] = float("nan")
    x.requires_grad_()
    sol = ik.fixed_point(
        lambda z: torch.tanh(z @ w.T + x),
        torch.zeros_like(x.detach()),
        solver=ik.Anderson(tol=1e-13, max_iter=200, on_failure="report"),
        gradient=ik.IFT(ik.GMRES(tol=1e-12, max_iter=200), on_failure="report"),
    )
    (gx,) = torch.autograd.grad(sol.value.sum(), x)
    want_x, _ = dense_gradients(w, x[1:], sol.value[1:])
    torch.testing.assert_close(gx[1:], want_x, rtol=1e-8, atol=1e-10)
    (stats,) = sol.backward_stats
    assert stats.result.tolist() == [ik.Result.nonfinite] + [ik.Result.successful] * 3


def test_gmres_solves_the_adjoint_where_the_fixed_point_adjoint_diverges():
    """``f(z) = A z + c`` with an eigenvalue of ``A`` at -1.6: ``u -> u A + g`` diverges, ``I - A`` is fine."""
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64))[0]
    a = (q @ torch.diag(torch.tensor([-1.6, 0.5, 0.3, -0.2], dtype=torch.float64)) @ q.T).requires_grad_()
    c = torch.randn(2, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - a.detach(), c.T).T
    start = ik.FixedPointIteration(tol=1e-10, max_iter=1, stop_mode="abs", on_failure="raise")

    def grad_with(adjoint):
        sol = ik.fixed_point(lambda z: z @ a.T + c, z_star.clone(), solver=start, gradient=adjoint)
        return torch.autograd.grad(sol.value.sum(), a)[0], sol.backward_stats[0]

    u = torch.linalg.solve(
        (torch.eye(4, dtype=torch.float64) - a.detach()).T, torch.ones(4, 2, dtype=torch.float64)
    )
    want = u @ z_star  # dL/dA = u^T z*, summed over samples
    got, stats = grad_with(ik.IFT(ik.GMRES(tol=1e-12), on_failure="raise"))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert stats.converged.all()
    with pytest.raises(ik.FixedPointError, match="IFT adjoint"):
        grad_with(ik.IFT(ik.FixedPointIteration(tol=1e-10, max_iter=200), on_failure="raise"))


def test_gradcheck_through_ift_with_gmres_on_a_tuple_state():
    w, x = tanh_problem(dim=3)
    gradient = ik.IFT(ik.GMRES(tol=1e-13, max_iter=50), on_failure="raise")
    solver = ik.Anderson(tol=1e-14, max_iter=300, on_failure="raise")

    def solve(w, x):
        def f(state):
            z, s = state
            return torch.tanh(z @ w.T + x), 0.5 * s + z[:, :1]

        start = (torch.zeros_like(x), torch.zeros(x.shape[0], 1, dtype=x.dtype))
        z, s = ik.fixed_point(f, start, solver=solver, gradient=gradient).value
        return z.sum(dim=1) + s.squeeze(1)

    assert torch.autograd.gradcheck(solve, (w, x), eps=1e-6, atol=1e-6)


def test_jvp_by_double_backward_is_the_dense_jacobian_product():
    w, x = tanh_problem(dim=4)
    z = torch.randn(4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    lin = ik.Linearization(lambda z: torch.tanh(z @ w.T + x), z)
    v = torch.randn(4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    jac = (1 - torch.tanh(z @ w.T + x) ** 2)[:, :, None] * w.detach()[None]
    torch.testing.assert_close(jvp_by_double_backward(lin.vjp, v), (jac @ v[..., None]).squeeze(-1))


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match=r"max_size=4.*GMRES"):
        ik.DirectSolve(max_size=4).solve(lambda v: v, torch.ones(1, 5))
    with pytest.raises(TypeError, match="apply_transposed"):
        ik.CG().solve(lambda v: v, torch.ones(1, 5))
    with pytest.raises(TypeError, match=r"fixed-point solver .* or a linear solver"):
        ik.IFT(solver=ik.JFB())
    with pytest.raises(ValueError, match="restart"):
        ik.GMRES(restart=0)


def test_forward_mode_tangent_with_a_linear_solver_equals_the_dense_solve():
    """``torch.func.jvp`` through IFT(GMRES()) and IFT(DirectSolve()): ``(I - J) t = diag(s) t_x``."""
    w, x = tanh_problem(dim=4)
    w, x = w.detach(), x.detach()
    t_x = torch.randn(4, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    forward = ik.Anderson(tol=1e-13, max_iter=200, on_failure="raise")

    def tangent_with(solver):
        gradient = ik.IFT(solver, on_failure="raise")

        def solve(x):
            return ik.fixed_point(
                lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), solver=forward, gradient=gradient
            ).value

        return torch.func.jvp(solve, (x,), (t_x,))

    z, t = tangent_with(ik.GMRES(tol=1e-12))
    s = 1 - z**2
    jac = s[:, :, None] * w[None]
    want = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - jac, s * t_x)
    torch.testing.assert_close(t, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(tangent_with(ik.DirectSolve(tol=1e-10))[1], want, rtol=1e-9, atol=1e-11)
    with pytest.raises(TypeError, match=r"IFT\(CG\(\)\) cannot solve for a forward-mode tangent.*GMRES"):
        tangent_with(ik.CG(tol=1e-12))


def float32_system(batch: int = 4, dim: int = 64, seed: int = 0):
    """``A = I - J`` in float32 with ``J`` non-normal, eigenvalues in [-0.99, 0.99]: float32 recurrences drift."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64))[0]
    jac = (q * torch.linspace(-0.99, 0.99, dim, dtype=torch.float64)) @ q.mT
    jac = (
        jac + 0.3 * torch.triu(torch.randn(batch, dim, dim, generator=gen, dtype=torch.float64), 1) / dim**0.5
    )
    a = torch.eye(dim, dtype=torch.float64) - jac
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return a, b


def true_residual(a, b, x):
    """``||b - A x|| / ||b||`` in float64, for the float32 solution ``x``."""
    r = b - (a @ x.double()[..., None]).squeeze(-1)
    return torch.linalg.vector_norm(r, dim=1) / torch.linalg.vector_norm(b, dim=1)


@pytest.mark.parametrize("name", ["GMRES", "CG"])
def test_a_float32_solve_reports_its_true_residual(name):
    """The estimates (GMRES's least squares, CG's recurrence) understate ``||b - A x||`` up to 6x here.

    A sample reported solved must be solved, and the reported residual is the one of the returned ``x``
    (up to float32's rounding of ``b - A x`` itself).
    """
    a, b = float32_system()
    a32, b32 = a.float(), b.float()
    solver = (
        ik.GMRES(tol=1e-6, restart=30, max_iter=2000) if name == "GMRES" else ik.CG(tol=1e-6, max_iter=3000)
    )
    x, stats = solver.solve(
        lambda v: (a32 @ v[..., None]).squeeze(-1),
        b32,
        apply_transposed=lambda v: (a32.mT @ v[..., None]).squeeze(-1),
    )
    true = true_residual(a, b, x)
    assert (true[stats.converged] <= 1.3e-6).all(), (true, stats.converged)
    torch.testing.assert_close(stats.residual.double(), true, rtol=0.6, atol=0)
    assert stats.trace[-1].tolist() == stats.residual.tolist()  # also for a sample reopened after idling


def test_gmres_stops_a_sample_whose_true_residual_no_longer_falls():
    """At ``tol=1e-9`` float32 cannot confirm a solve: a sample the estimate calls solved is restarted while
    its true residual falls, and then stopped, not run to ``max_iter``."""
    a, b = float32_system()
    a32 = a.float()
    x, stats = ik.GMRES(tol=1e-9, restart=30, max_iter=2000).solve(
        lambda v: (a32 @ v[..., None]).squeeze(-1), b.float()
    )
    assert (stats.result == ik.Result.max_steps_reached).all()
    assert int((stats.nstep < 300).sum()) >= 2, stats.nstep
    assert (true_residual(a, b, x) < 1e-5).all()


def test_direct_solve_treats_a_singular_sample_as_one_sample():
    """One singular matrix failed the whole batch (torch.linalg.solve raised), bypassing IFT's per-sample
    failure policy. Now that sample gets the least-norm solution, judged by its residual like any other."""
    a = torch.eye(2, dtype=torch.float64).repeat(3, 1, 1)
    a[0, 0, 0] = 0.0  # singular: the first coordinate is not reached
    a[2] = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 4.0], [1.0, 2.0], [1.0, 1.0]], dtype=torch.float64)  # sample 0 consistent
    x, stats = ik.DirectSolve(tol=1e-10).solve(lambda v: (a @ v[..., None]).squeeze(-1), b)
    assert torch.allclose(x[0], torch.tensor([0.0, 4.0], dtype=torch.float64))  # the least-norm solution
    assert torch.allclose(x[1:], torch.linalg.solve(a[1:], b[1:]))
    assert stats.converged.tolist() == [True, True, True]
    b[0, 0] = 1.0  # now no x solves sample 0: it alone is reported, the others are untouched
    x, stats = ik.DirectSolve(tol=1e-10).solve(lambda v: (a @ v[..., None]).squeeze(-1), b)
    assert stats.converged.tolist() == [False, True, True]
    assert torch.allclose(x[1:], torch.linalg.solve(a[1:], b[1:]))
    # Built out of place: a gradient through the solve (the LU's output was changed in place) still runs.
    a_grad = a.clone().requires_grad_()
    x, _ = ik.DirectSolve(tol=1e-10).solve(lambda v: (a_grad @ v[..., None]).squeeze(-1), b)
    x[1:].sum().backward()
    assert torch.isfinite(a_grad.grad).all()
