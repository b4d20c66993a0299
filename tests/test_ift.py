"""IFT: the implicit gradient against a float64 dense solve of (I - J) and against finite differences."""

from __future__ import annotations

import pytest
import torch
from problems import contraction
from torch import nn

import implicitkit as ik

TIGHT = dict(tol=1e-13, max_iter=400, stop_mode="abs")


def tight_ift() -> ik.IFT:
    return ik.IFT(ik.Anderson(**TIGHT), on_failure="raise")


class TupleCell(nn.Module):
    """A cell on the structured state ``(a [B, 3], b [B, 2, 2])``: two leaves of different shapes."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.w = nn.Parameter(contraction(7, 0.7, generator))
        self.u = nn.Parameter(torch.randn(7, 5, generator=generator, dtype=torch.float64))

    def forward(self, state, x):
        a, b = state
        z = torch.cat([a, b.flatten(1)], dim=1)
        out = torch.tanh(z @ self.w.T + x @ self.u.T)
        return out[:, :3], out[:, 3:].reshape(-1, 2, 2)


def dense_reference(cell_of_flat, z_star_flat: torch.Tensor, g_flat: torch.Tensor) -> torch.Tensor:
    """Per-sample ``u = g (I - J)^-1`` with J as a dense float64 Jacobian and a direct linear solve."""
    rows = []
    for b in range(z_star_flat.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda z: cell_of_flat(z[None], b)[0], z_star_flat[b])
        eye = torch.eye(jac.shape[0], dtype=jac.dtype)
        rows.append(torch.linalg.solve((eye - jac).T, g_flat[b]))
    return torch.stack(rows)


def test_tensor_state_matches_dense_solve(gen):
    a = contraction(10, 0.8, gen)
    w = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 10, generator=gen, dtype=torch.float64)

    def cell(z, x):
        return torch.tanh(z @ a.T + x @ w.T)

    sol = ik.fixed_point(
        lambda z: cell(z, x),
        torch.zeros(5, 10, dtype=torch.float64),
        gradient=tight_ift(),
        solver=ik.Anderson(**TIGHT),
    )
    loss = ((sol.value - target) ** 2).sum()
    grad_w, grad_x = torch.autograd.grad(loss, [w, x])

    z_star = sol.value.detach()
    u = dense_reference(lambda z, b: cell(z, x[b : b + 1]), z_star, 2 * (z_star - target))
    ref_w, ref_x = torch.autograd.grad(cell(z_star, x), [w, x], u)
    assert torch.linalg.norm(grad_w - ref_w) / torch.linalg.norm(ref_w) <= 1e-6
    assert torch.linalg.norm(grad_x - ref_x) / torch.linalg.norm(ref_x) <= 1e-6


def test_tuple_state_matches_dense_solve(gen):
    cell = TupleCell(gen)
    x = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z0 = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 2, 2, dtype=torch.float64))
    deq = ik.DEQ(cell, solver=ik.Broyden(**TIGHT), gradient=tight_ift())
    (a, b), stats = deq(z0, x)
    assert stats.converged.all()
    weights = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    loss = (a * weights[:, :3]).sum() + (b.flatten(1) ** 2 * weights[:, 3:]).sum()
    params = [cell.w, cell.u, x]
    grads = torch.autograd.grad(loss, params)

    z_star = torch.cat([a.detach(), b.detach().flatten(1)], dim=1)

    def cell_of_flat(z, i):
        out = cell((z[:, :3], z[:, 3:].reshape(-1, 2, 2)), x[i : i + 1])
        return torch.cat([out[0], out[1].flatten(1)], dim=1)

    g = torch.cat([weights[:, :3], 2 * b.detach().flatten(1) * weights[:, 3:]], dim=1)
    u = dense_reference(cell_of_flat, z_star, g)
    fz = cell((z_star[:, :3], z_star[:, 3:].reshape(-1, 2, 2)), x)
    refs = torch.autograd.grad(torch.cat([fz[0], fz[1].flatten(1)], dim=1), params, u)
    for got, ref in zip(grads, refs):
        assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) <= 1e-6


def test_gradcheck_float64(gen):
    a = contraction(4, 0.6, gen)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def solve(x, w):
        z, _ = ik.fixed_point(
            lambda z: torch.tanh(z @ a.T + x @ w.T),
            torch.zeros(3, 4, dtype=torch.float64),
            solver=ik.Anderson(**TIGHT),
            gradient=tight_ift(),
        )
        return z

    assert torch.autograd.gradcheck(solve, (x, w), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_backward_stats_are_observable(gen):
    a = contraction(6, 0.5, gen)
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    seen = []
    gradient = ik.IFT(ik.Anderson(tol=1e-10, max_iter=50, stop_mode="abs"), callback=seen.append)
    sol = ik.fixed_point(lambda z: torch.tanh(z @ a.T + x), torch.zeros_like(x), gradient=gradient)
    assert sol.backward_stats == []
    sol.value.sum().backward()
    (stats,) = sol.backward_stats
    assert seen == [stats]
    assert stats.nstep.shape == (3,) and stats.converged.all() and (stats.residual <= 1e-10).all()
    assert stats.fallback is None


def test_module_used_twice_in_one_graph(gen):
    """The same cell solved twice (different inputs) in one graph: both gradients add up correctly."""
    cell = nn.Linear(6, 6).double()
    with torch.no_grad():
        cell.weight.copy_(contraction(6, 0.5, gen))

    def run(x):
        return ik.fixed_point(
            lambda z: torch.tanh(cell(z) + x),
            torch.zeros_like(x),
            solver=ik.Anderson(**TIGHT),
            gradient=tight_ift(),
        ).value

    x1 = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    x2 = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    (run(x1).sum() + (run(x2) ** 2).sum()).backward()
    both = cell.weight.grad.clone()
    cell.weight.grad = None
    run(x1).sum().backward()
    first = cell.weight.grad.clone()
    cell.weight.grad = None
    (run(x2) ** 2).sum().backward()
    assert torch.allclose(both, first + cell.weight.grad, atol=1e-10)


def test_gradient_does_not_reach_the_initial_state(gen):
    """The fixed point does not depend on where the solver starts, so z0 gets no gradient from IFT."""
    a = contraction(4, 0.5, gen)
    z0 = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    z, _ = ik.fixed_point(lambda z: torch.tanh(z @ a.T + x), z0)
    z.sum().backward()
    assert z0.grad is None and x.grad is not None


def test_ift_raise_on_unconverged_adjoint(gen):
    a = contraction(8, 0.95, gen)
    x = torch.randn(2, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    gradient = ik.IFT(ik.FixedPointIteration(tol=1e-12, max_iter=2), on_failure="raise")
    z, _ = ik.fixed_point(
        lambda z: z @ a.T + x, torch.zeros_like(x), gradient=gradient, solver=ik.Anderson(**TIGHT)
    )
    with pytest.raises(ik.FixedPointError, match=r"IFT adjoint.*max_iter=2"):
        z.sum().backward()


@pytest.mark.parametrize("scale", [1.0, 1e-13])
def test_the_relative_adjoint_rule_holds_at_any_scale_of_the_loss(scale):
    """The default adjoint stops on ||u_{k+1} - u_k|| / (||u_{k+1}|| + 1e-8): for a cotangent far below 1e-8
    the guard rules and the rule turns absolute, ending the solve early (5e-3 off at a loss scaled by 1e-13).
    The system is linear, so it is solved for g / ||g|| and scaled back: grad(c L) / c is the same gradient at
    every c."""
    gen = torch.Generator().manual_seed(0)
    w = contraction(16, 0.9, gen)
    x0 = torch.randn(4, 16, generator=gen, dtype=torch.float64)

    def gradient(c: float) -> torch.Tensor:
        x = x0.clone().requires_grad_()
        f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731
        value = ik.fixed_point(f, torch.zeros_like(x0), solver=ik.Anderson(**TIGHT), gradient=ik.IFT()).value
        (g,) = torch.autograd.grad(c * (value**2).sum(), x)
        return g / c

    x = x0.clone().requires_grad_()  # the reference: the iteration unrolled to convergence
    z = torch.zeros_like(x0)
    for _ in range(600):
        z = torch.tanh(z @ w.T + x)
    (exact,) = torch.autograd.grad((z**2).sum(), x)
    # The default adjoint's tolerance (1e-6, relative) bounds the error, at every scale alike.
    assert torch.linalg.vector_norm(gradient(scale) - exact) <= 2e-6 * torch.linalg.vector_norm(exact)
