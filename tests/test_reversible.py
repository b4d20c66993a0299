"""Reversible against references it does not share code with.

- the plain autograd gradient of the same coupled iteration, written out here step by step (float64);
- the dense implicit gradient ``c (I - A)^-1`` of a linear map, at convergence;
- ``gradcheck`` (central finite differences);
- the forward iterates themselves, recorded as the forward pass calls f, against the points the backward
  pass calls f at while it rebuilds them.
"""

from __future__ import annotations

import pytest
import torch
from problems import contraction
from torch import nn

import implicitkit as ik

B, D = 3, 4
F64 = torch.float64


def coupled(f, z0, beta: float, steps: int):
    """The reversible iteration unrolled with autograd: ``steps`` pair steps from ``y_0 = z_0 = z0``."""
    y = z = z0
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z)
        z = (1 - beta) * z + beta * f(y)
    return z


def tanh_problem(seed: int = 0, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    w = (scale * torch.randn(D, D, generator=gen, dtype=F64) / D**0.5).requires_grad_()
    x = torch.randn(B, D, generator=gen, dtype=F64).requires_grad_()
    z0 = (0.1 * torch.randn(B, D, generator=gen, dtype=F64)).requires_grad_()
    c = torch.randn(B, D, generator=gen, dtype=F64)
    return w, x, z0, c


def fixed_count(steps: int) -> ik.FixedPointIteration:
    return ik.FixedPointIteration(tol=None, max_iter=steps)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def assert_close(got, want, tol=1e-10):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.5])
def test_gradient_equals_unrolled_coupled_iteration(beta):
    w, x, z0, c = tanh_problem()

    def f(z):
        return torch.tanh(z @ w.T + x)

    sol = ik.fixed_point(f, z0, solver=fixed_count(6), gradient=ik.Reversible(beta))
    want_z = coupled(f, z0, beta, 6)
    torch.testing.assert_close(sol.value, want_z, rtol=0, atol=1e-14)
    assert_close(grads((sol.value * c).sum(), [w, x, z0]), grads((want_z * c).sum(), [w, x, z0]))
    assert (sol.stats.nstep == 6).all()


@pytest.mark.parametrize(("beta", "tol", "every"), [(0.5, 1e-3, None), (0.8, 1e-7, 3)])
def test_each_sample_differentiates_its_own_steps(beta, tol, every):
    """Samples stop at different steps; each one's gradient is that of its own step count."""
    w, x, z0, c = tanh_problem()
    x = (x * torch.tensor([[0.1], [1.0], [3.0]], dtype=F64)).detach().requires_grad_()

    def f(z):
        return torch.tanh(z @ w.T + x)

    solver = ik.FixedPointIteration(tol=tol, max_iter=40, stop_mode="abs")
    sol = ik.fixed_point(f, z0, solver=solver, gradient=ik.Reversible(beta, checkpoint_every=every))
    steps = sol.stats.nstep.tolist()
    assert len(set(steps)) > 1 and sol.stats.all_converged
    got = grads((sol.value * c).sum(), [w, x, z0])
    want_z = torch.cat([coupled(f, z0, beta, n)[i : i + 1] for i, n in enumerate(steps)])
    torch.testing.assert_close(sol.value, want_z, rtol=0, atol=1e-14)
    assert_close(got, grads((want_z * c).sum(), [w, x, z0]), tol=1e-10)


def test_tends_to_the_dense_implicit_gradient_at_convergence():
    """On ``f(z) = A z + B x``, a tight solve's gradient is ``u = c (I - A)^-1`` applied through f."""
    gen = torch.Generator().manual_seed(0)
    a = contraction(D, 0.6, gen)
    b = torch.randn(D, 3, generator=gen, dtype=F64)
    x = torch.randn(B, 3, generator=gen, dtype=F64)
    c = torch.randn(B, D, generator=gen, dtype=F64)
    eye = torch.eye(D, dtype=F64)
    z_star = torch.linalg.solve(eye - a, b @ x.T).T
    u = torch.linalg.solve((eye - a).T, c.T).T
    want = [u @ b, u.T @ z_star, u.T @ x]
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    solver = ik.FixedPointIteration(tol=1e-12, max_iter=200, stop_mode="abs")
    sol = ik.fixed_point(
        lambda z: z @ leaves[1].T + leaves[0] @ leaves[2].T,
        torch.zeros(B, D, dtype=F64),
        solver=solver,
        gradient=ik.Reversible(0.8, checkpoint_every=5),
    )
    assert sol.stats.all_converged and int(sol.stats.nstep.max()) > 20
    assert_close(grads((sol.value * c).sum(), leaves), want, tol=1e-9)


def test_gradcheck():
    w, x, z0, _ = tanh_problem(seed=1)

    def solve(w, x, z0):
        return ik.fixed_point(
            lambda z: torch.tanh(z @ w.T + x), z0, solver=fixed_count(4), gradient=ik.Reversible(0.7)
        ).value

    assert torch.autograd.gradcheck(solve, (w, x, z0))


def test_tuple_state():
    gen = torch.Generator().manual_seed(2)
    m = (0.4 * torch.randn(3, 2, generator=gen, dtype=F64)).requires_grad_()
    x = torch.randn(B, 2, generator=gen, dtype=F64).requires_grad_()

    def f(state):
        a, b = state
        return torch.tanh(b @ m + x), 0.5 * torch.sin(a).repeat(1, 2)[:, :3] + 0.1 * b

    z0 = (torch.zeros(B, 2, dtype=F64), torch.zeros(B, 3, dtype=F64))
    sol = ik.fixed_point(f, z0, solver=fixed_count(5), gradient=ik.Reversible(1.2))
    y = z = z0
    for _ in range(5):  # the coupled iteration leaf by leaf
        y = tuple(0.2 * -yi + 1.2 * fi for yi, fi in zip(y, f(z), strict=True))
        z = tuple(0.2 * -zi + 1.2 * fi for zi, fi in zip(z, f(y), strict=True))
    for got, want in zip(sol.value, z, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    loss = sol.value[0].sum() + (sol.value[1] ** 2).sum()
    assert_close(grads(loss, [m, x]), grads(z[0].sum() + (z[1] ** 2).sum(), [m, x]))


def test_backward_rebuilds_the_forward_iterates():
    """The backward pass calls f at exactly the forward pass's points, in reverse order."""
    w, x, z0, c = tanh_problem()
    calls: list[torch.Tensor] = []

    def f(z):
        calls.append(z.detach().clone())
        return torch.tanh(z @ w.T + x)

    sol = ik.fixed_point(f, z0, solver=fixed_count(8), gradient=ik.Reversible(0.6))
    forward = list(calls)
    loss = (sol.value * c).sum()
    calls.clear()
    loss.backward()
    assert len(forward) == len(calls) == 16
    for seen, rebuilt in zip(reversed(forward), calls, strict=True):
        torch.testing.assert_close(rebuilt, seen, rtol=0, atol=1e-11)
    (stats,) = sol.backward_stats
    assert isinstance(stats, ik.ReversibleStats)
    assert (stats.nstep == 8).all() and float(stats.reconstruction_error.max()) < 1e-11


def test_checkpoints_bound_the_drift_and_keep_the_gradient():
    """Long float32 solves: without checkpoints the rebuilt path is lost; with them it stays exact."""
    w, x, z0, c = (t.detach().float() for t in tanh_problem())
    w.requires_grad_()

    def f(z):
        return torch.tanh(z @ w.T + x)

    want = grads((coupled(f, z0, 0.8, 30) * c).sum(), [w])[0]
    drift, error = {}, {}
    for every in (None, 3):
        gradient = ik.Reversible(0.8, checkpoint_every=every)
        sol = ik.fixed_point(f, z0, solver=fixed_count(30), gradient=gradient)
        got = grads((sol.value * c).sum(), [w])[0]
        drift[every] = float(sol.backward_stats[0].reconstruction_error.max())
        error[every] = float((got - want).norm() / want.norm())
    assert drift[None] > 1.0 and error[None] > 1e-3
    assert drift[3] < 1e-3 and error[3] < 1e-4
    a = torch.tensor(0.99, requires_grad=True)  # slow: far from converged after 60 steps
    sol = ik.fixed_point(lambda z: a * z + x, z0, solver=fixed_count(60), gradient=ik.Reversible(0.8))
    with pytest.warns(RuntimeWarning, match="overflowed"):
        (g,) = grads(sol.value.sum(), [a])
    assert not torch.isfinite(g) and not torch.isfinite(sol.backward_stats[0].reconstruction_error).all()


def test_path_branches_differentiate_their_own_steps():
    w, x, z0, c = tanh_problem()

    def f(z):
        return torch.tanh(z @ w.T + x)

    sol = ik.fixed_point(f, z0, solver=fixed_count(6), capture=[2, 4], gradient=ik.Reversible(0.8))
    for k, branch in zip((2, 4), sol.path, strict=True):
        want_z = coupled(f, z0, 0.8, k)
        torch.testing.assert_close(branch, want_z, rtol=0, atol=1e-14)
        assert_close(grads((branch * c).sum(), [w, x]), grads((want_z * c).sum(), [w, x]))


class _Scale(torch.autograd.Function):
    """``a * s`` with a hand-written backward: its inputs are not seen by a TorchFunctionMode."""

    @staticmethod
    def forward(ctx, a, s):
        ctx.save_for_backward(a, s)
        return a * s

    @staticmethod
    def backward(ctx, g):
        a, s = ctx.saved_tensors
        return g * s, (g * a).sum(0)


def test_what_f_closes_over_gets_its_gradient():
    """Module parameters, an input computed by an encoder, a weight used inside f and to build that input,
    and a tensor used only through a custom autograd.Function."""
    torch.manual_seed(0)
    cell = nn.Linear(D, D).double()
    encoder = nn.Linear(2, D).double()
    scale = torch.full((D,), 0.7, dtype=F64, requires_grad=True)
    raw = torch.randn(B, 2, dtype=F64)
    c = torch.randn(B, D, dtype=F64)
    params = [*cell.parameters(), *encoder.parameters(), scale]

    def run(gradient):
        x = encoder(raw) + raw.sum(1, keepdim=True) * cell.weight.sum(0)  # cell.weight also outside f

        def f(z):
            return _Scale.apply(torch.tanh(cell(z) + x), scale)

        if gradient is None:
            return coupled(f, torch.zeros(B, D, dtype=F64), 0.8, 5)
        return ik.fixed_point(f, torch.zeros(B, D, dtype=F64), solver=fixed_count(5), gradient=gradient).value

    want = grads((run(None) * c).sum(), params)
    assert_close(grads((run(ik.Reversible(0.8)) * c).sum(), params), want)


def test_a_tensor_the_watch_cannot_see_is_an_error_not_a_lost_gradient():
    w = torch.eye(D, dtype=F64).mul(0.5).requires_grad_()

    def f(z):
        with torch._C.DisableTorchFunction():  # hides w from the watch
            h = z @ w
        return torch.tanh(h) + 1

    sol = ik.fixed_point(f, torch.zeros(B, D, dtype=F64), solver=fixed_count(3), gradient=ik.Reversible())
    with pytest.raises(RuntimeError, match="watching the torch operations"):
        sol.value.sum().backward()


def test_deq_module_and_no_grad():
    torch.manual_seed(1)
    cell = nn.Sequential(nn.Linear(D, D), nn.Tanh()).double()
    deq = ik.DEQ(lambda z, x: cell(z) + x, solver=fixed_count(5), gradient=ik.Reversible(0.8))
    x = torch.randn(B, D, dtype=F64)
    with torch.no_grad():
        value, stats = deq(torch.zeros(B, D, dtype=F64), x)
    assert not value.requires_grad and (stats.nstep == 5).all()
    value, _ = deq(torch.zeros(B, D, dtype=F64), x)
    want_z = coupled(lambda z: cell(z) + x, torch.zeros(B, D, dtype=F64), 0.8, 5)
    torch.testing.assert_close(value, want_z, rtol=0, atol=1e-14)
    params = list(cell.parameters())
    assert_close(grads(value.sum(), params), grads(want_z.sum(), params))


def test_refusals_say_what_to_do():
    w, x, z0, _ = tanh_problem()

    def f(z):
        return torch.tanh(z @ w.T + x)

    with pytest.raises(ValueError, match="not be 1"):
        ik.Reversible(1.0)
    with pytest.raises(ValueError, match=r"\(0, 2\)"):
        ik.Reversible(2.0)
    with pytest.raises(TypeError, match="FixedPointIteration"):
        ik.fixed_point(f, z0, solver=ik.Anderson(), gradient=ik.Reversible())
    with pytest.raises(TypeError, match="without damping"):
        ik.fixed_point(f, z0, solver=ik.FixedPointIteration(damping=0.5), gradient=ik.Reversible())
    with pytest.raises(ValueError, match="perturbation"):
        ik.fixed_point(f, z0, solver=fixed_count(3), gradient=ik.Reversible(), perturbation=lambda z, k: z)
    with pytest.raises(TypeError, match="pair of states"):
        ik.Reversible().attach(f, z0)
    sol = ik.fixed_point(f, z0, solver=fixed_count(3), gradient=ik.Reversible())
    with pytest.raises(RuntimeError, match="second derivative"):
        torch.autograd.grad(sol.value.sum(), [w], create_graph=True)


def test_stats_count_pair_steps_and_report_failures():
    w, x, z0, _ = tanh_problem()

    def f(z):
        return torch.tanh(z @ w.T + x)

    solver = ik.FixedPointIteration(tol=1e-30, max_iter=4, on_failure="warn")
    with pytest.warns(RuntimeWarning, match="Reversible"):
        sol = ik.fixed_point(f, z0, solver=solver, gradient=ik.Reversible())
    assert (sol.stats.nstep == 4).all() and not sol.stats.converged.any()
    assert sol.stats.solver == "Reversible(beta=0.8)"
    torch.testing.assert_close(sol.last, coupled(f, z0, 0.8, 4).detach(), rtol=0, atol=1e-14)


def test_aux_output_through_reversible_matches_the_written_out_iteration():
    """``has_aux`` with Reversible: the aux is evaluated once more at the value, with its graph."""
    gen = torch.Generator().manual_seed(5)
    w = (0.3 * torch.randn(4, 4, generator=gen, dtype=torch.float64)).requires_grad_()
    x = torch.randn(2, 4, generator=gen, dtype=torch.float64)

    def f(z):
        fz = torch.tanh(z @ w.T + x)
        return fz, fz.sum(dim=1)

    solver = ik.FixedPointIteration(tol=None, max_iter=6)
    sol = ik.fixed_point(
        f, torch.zeros_like(x), solver=solver, gradient=ik.Reversible(beta=0.8), has_aux=True
    )
    (grad,) = torch.autograd.grad(sol.aux.sum(), w)
    # the same pair iteration written out with autograd
    y = z = torch.zeros_like(x)
    for _ in range(6):
        y = 0.2 * y + 0.8 * f(z)[0]
        z = 0.2 * z + 0.8 * f(y)[0]
    (expected,) = torch.autograd.grad(f(z)[1].sum(), w)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-11)
