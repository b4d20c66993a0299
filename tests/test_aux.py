"""Auxiliary outputs (``has_aux=True``): which evaluation ``Solution.aux`` comes from, and its gradient.

The map is ``f(z) = tanh(z W^T + x)``, and the cell's aux is ``a = sum_j v_j f(z)_j`` per sample (plus a
non-tensor entry). References are dense float64 algebra: ``z*`` from 300 plain iterations,
``J = df/dz`` and ``df/dtheta`` from ``torch.autograd.functional.jacobian``, ``dz*/dtheta`` from
``torch.linalg.solve(I - J, df/dtheta)``.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.nn.parallel.distributed import _find_tensors
from torch.utils import _pytree as pytree

import implicitkit as ik

B, D = 2, 3
TIGHT = dict(tol=1e-13, max_iter=300, stop_mode="abs")


def problem():
    gen = torch.Generator().manual_seed(0)
    w = 0.5 * torch.randn(D, D, generator=gen, dtype=torch.float64) / D**0.5
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    v = torch.randn(D, generator=gen, dtype=torch.float64)
    c1 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    c2 = torch.randn(B, generator=gen, dtype=torch.float64)
    return w, x, v, c1, c2


def state_map(z, w, x):
    return torch.tanh(z @ w.T + x)


def aux_map(z, w, x, v):
    return state_map(z, w, x) @ v


def solve(estimator, w, x, v, solver=None):
    def f(z):
        new = state_map(z, w, x)
        return new, {"a": new @ v, "name": "energy"}

    return ik.fixed_point(
        f, torch.zeros_like(x), solver=solver or ik.Anderson(**TIGHT), gradient=estimator, has_aux=True
    )


def fixed_point_of(w, x):
    z = torch.zeros(B, D, dtype=torch.float64)
    for _ in range(300):
        z = state_map(z, w, x)
    return z


def dense_grads(w, x, v, c1, c2):
    """Exact ``dL/d(w, x, v)`` for ``L = sum(c1 z*) + sum(c2 a(z*))``, ``a`` evaluated at ``z*``."""
    z = fixed_point_of(w, x)
    eye = torch.eye(B * D, dtype=torch.float64)
    jac = jacobian(lambda s: state_map(s, w, x), z).reshape(B * D, B * D)
    dz = [
        torch.linalg.solve(eye - jac, jacobian(lambda p: state_map(z, p, x), w).reshape(B * D, -1)),
        torch.linalg.solve(eye - jac, jacobian(lambda p: state_map(z, w, p), x).reshape(B * D, -1)),
    ]
    zz, ww, xx, vv = (t.clone().requires_grad_() for t in (z, w, x, v))
    loss = (c1 * zz).sum() + (c2 * aux_map(zz, ww, xx, vv)).sum()
    g_z, g_w, g_x, g_v = torch.autograd.grad(loss, (zz, ww, xx, vv))
    g_z = g_z.reshape(1, -1)
    return (g_w + (g_z @ dz[0]).reshape(w.shape), g_x + (g_z @ dz[1]).reshape(x.shape), g_v)


def estimator_grads(estimator, w, x, v, c1, c2, solver=None):
    w, x, v = (t.clone().requires_grad_() for t in (w, x, v))
    sol = solve(estimator, w, x, v, solver)
    loss = (c1 * sol.value).sum() + (c2 * sol.aux["a"]).sum()
    return torch.autograd.grad(loss, (w, x, v)), sol


@pytest.mark.parametrize(
    "estimator, solver",
    [
        (ik.IFT(ik.Anderson(**TIGHT), on_failure="raise"), None),
        (ik.Neumann(k=200), None),
        (ik.Unrolled(), ik.FixedPointIteration(**TIGHT)),
    ],
    ids=["IFT", "Neumann", "Unrolled"],
)
def test_aux_gradient_equals_dense_implicit_gradient(estimator, solver):
    w, x, v, c1, c2 = problem()
    got, sol = estimator_grads(estimator, w, x, v, c1, c2, solver)
    for g, ref in zip(got, dense_grads(w, x, v, c1, c2), strict=True):
        assert torch.allclose(g, ref, rtol=1e-9, atol=1e-11)
    # The aux is that of f at the returned z*; non-tensor entries pass through.
    assert torch.allclose(sol.aux["a"], aux_map(fixed_point_of(w, x), w, x, v), atol=1e-12)
    assert sol.aux["name"] == "energy"


@pytest.mark.parametrize("estimator", [ik.JFB(), ik.RAG(2), ik.Phantom(3, 0.5)], ids=repr)
def test_aux_of_applying_estimators_is_their_last_application(estimator):
    """Unrolled reference from the detached ``z*``: the aux of the ``k``-th grad-attached application."""
    w, x, v, c1, c2 = problem()
    got, sol = estimator_grads(estimator, w, x, v, c1, c2, ik.Anderson(**TIGHT))
    ww, xx, vv = (t.clone().requires_grad_() for t in (w, x, v))
    z = sol.last.detach()
    k, tau = (1, 1.0) if isinstance(estimator, ik.JFB) else (estimator.k, estimator.tau)
    for _ in range(k):
        fz = state_map(z, ww, xx)
        aux = fz @ vv
        z = (1 - tau) * z + tau * fz
    ref = torch.autograd.grad((c1 * z).sum() + (c2 * aux).sum(), (ww, xx, vv))
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-10, atol=1e-12)
    assert torch.allclose(sol.aux["a"].detach(), aux.detach(), atol=1e-12)


def test_deq_has_aux_and_the_error_for_a_cell_without_a_pair():
    class Cell(torch.nn.Module):
        def __init__(self, pair: bool) -> None:
            super().__init__()
            self.lin, self.pair = torch.nn.Linear(D, D).double(), pair

        def forward(self, z, x):
            new = torch.tanh(0.5 * self.lin(z) + x)
            return (new, new.norm(dim=1)) if self.pair else new

    x = torch.randn(B, D, dtype=torch.float64)
    sol = ik.DEQ(Cell(pair=True), has_aux=True)(torch.zeros_like(x), x)
    assert torch.allclose(sol.aux, sol.value.norm(dim=1), atol=1e-3)
    sol.aux.sum().backward()  # the aux carries the IFT gradient to the cell
    assert sol.backward_stats and sol.backward_stats[-1].all_converged
    with pytest.raises(TypeError, match=r"has_aux=True the map must return a pair \(state, aux\).*Tensor"):
        ik.DEQ(Cell(pair=False), has_aux=True)(torch.zeros_like(x), x)
    assert ik.DEQ(Cell(pair=False))(torch.zeros_like(x), x).aux is None


def test_aux_is_a_pytree_child_and_empty_batches_evaluate_it():
    w, x, v, *_ = problem()
    sol = solve(ik.IFT(), w, x, v.requires_grad_())
    leaves, spec = pytree.tree_flatten(sol)
    assert any(leaf is sol.aux["a"] for leaf in leaves)  # DDP's output sink and pytree users see it
    assert any(t is sol.aux["a"] for t in _find_tensors(sol))  # as does find_unused_parameters
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert rebuilt.aux["a"] is sol.aux["a"] and rebuilt.aux["name"] == "energy"
    empty = solve(ik.IFT(), w, x[:0], v)
    assert empty.aux["a"].shape == (0,) and empty.value.shape == (0, D)
