"""Spectral radius against ``torch.linalg.eigvals``; the gradient audit against dense closed forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import contraction

import implicitkit as ik


def batched_linear(mats):
    """``f(z)_b = M_b z_b``: every sample has its own Jacobian ``M_b``."""
    return lambda z: torch.einsum("bij,bj->bi", mats, z)


def with_spectrum(eigenvalues, gen, symmetric):
    n = len(eigenvalues)
    q = torch.randn(n, n, generator=gen, dtype=torch.float64)
    if symmetric:
        q, _ = torch.linalg.qr(q)
        return q @ torch.diag(eigenvalues) @ q.T
    q = q + 2 * torch.eye(n, dtype=torch.float64)  # well conditioned, not orthogonal: a non-normal matrix
    return q @ torch.diag(eigenvalues) @ torch.linalg.inv(q)


@settings(max_examples=15, deadline=None)
@given(
    top=st.floats(0.05, 3.0),
    sign=st.sampled_from([-1.0, 1.0]),
    gap=st.floats(0.3, 0.9),
    symmetric=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_power_iteration_matches_eigvals_for_a_real_dominant_eigenvalue(top, sign, gap, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(3):
        rest = (torch.rand(5, generator=gen, dtype=torch.float64) * 2 - 1) * gap * top
        mats.append(
            with_spectrum(torch.cat([torch.tensor([sign * top], dtype=torch.float64), rest]), gen, symmetric)
        )
    mats = torch.stack(mats)
    want = torch.linalg.eigvals(mats).abs().max(dim=1).values
    got = ik.spectral_radius(
        batched_linear(mats), torch.zeros(3, 6, dtype=torch.float64), n_iter=400, generator=gen
    )
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_complex_dominant_pair():
    """A rotation-scaling block dominates: the estimate converges, more slowly, to its modulus."""
    gen = torch.Generator().manual_seed(0)
    block = 0.9 * torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    m = torch.block_diag(block, torch.diag(torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)))
    q = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 2 * torch.eye(5, dtype=torch.float64)
    m = (q @ m @ torch.linalg.inv(q))[None]
    want = torch.linalg.eigvals(m).abs().max()
    got = ik.spectral_radius(
        batched_linear(m), torch.zeros(1, 5, dtype=torch.float64), n_iter=1000, generator=gen
    )
    torch.testing.assert_close(got[0], want, atol=0, rtol=1e-2)


def test_nonlinear_map_at_its_fixed_point():
    gen = torch.Generator().manual_seed(3)
    w = contraction(6, 0.9, gen)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ w.T + x)

    z_star, _ = ik.fixed_point(f, torch.zeros_like(x), solver=ik.Anderson(tol=1e-12, max_iter=200))
    got = ik.spectral_radius(f, z_star, n_iter=300, generator=gen)
    for b in range(4):
        jac = (1 - f(z_star)[b] ** 2)[:, None] * w  # d tanh(w z + x)/dz
        want = torch.linalg.eigvals(jac).abs().max()
        torch.testing.assert_close(got[b], want, atol=0, rtol=2e-2)


def test_structured_state_and_no_graph():
    gen = torch.Generator().manual_seed(4)
    m = with_spectrum(torch.tensor([0.7, 0.2, -0.1], dtype=torch.float64), gen, symmetric=True)

    def f(state):
        a, b = state
        out = torch.cat([a, b], dim=1) @ m.T
        return out[:, :1], out[:, 1:]

    state = (torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64))
    rho = ik.spectral_radius(f, state, n_iter=200)
    assert not rho.requires_grad
    torch.testing.assert_close(rho, torch.full((2,), 0.7, dtype=torch.float64), atol=0, rtol=1e-6)


# -- gradient audit ---------------------------------------------------------------------------------------


def linear_setup(a, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = a.shape[0]
    b = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, d, generator=gen, dtype=torch.float64)
    return b, x, c


def audit(estimator, a, b, x, c, **kw):
    return ik.gradient_audit(
        lambda z: z @ a.T + x @ b.T,
        torch.zeros(4, a.shape[0], dtype=torch.float64),
        lambda z: (z * c).sum(),
        estimator,
        wrt=[x],
        **kw,
    )


def closed_form_comparison(poly, a, b, c):
    exact = c @ torch.linalg.inv(torch.eye(a.shape[0], dtype=torch.float64) - a) @ b
    est = c @ poly @ b
    cosine = (exact * est).sum() / (exact.norm() * est.norm())
    return float(cosine), float((est - exact).norm() / exact.norm())


@pytest.mark.parametrize("k", [0, 1, 3])
def test_audit_of_neumann_matches_the_closed_form(k):
    gen = torch.Generator().manual_seed(0)
    a = contraction(5, 0.8, gen)
    b, x, c = linear_setup(a)
    result = audit(ik.Neumann(k), a, b, x, c)
    poly = sum(torch.linalg.matrix_power(a, t) for t in range(k + 1))
    cosine, rel = closed_form_comparison(poly, a, b, c)
    assert result.cosine == pytest.approx(cosine, abs=1e-9)
    assert result.relative_error == pytest.approx(rel, abs=1e-9)
    assert result.descent and result.forward.all_converged and result.adjoint.all_converged
    assert "Neumann" in str(result)


def test_audit_of_the_reference_against_itself():
    gen = torch.Generator().manual_seed(1)
    a = contraction(5, 0.9, gen)
    b, x, c = linear_setup(a)
    result = audit(ik.IFT(ik.Anderson(tol=1e-12, max_iter=300, stop_mode="abs")), a, b, x, c)
    assert result.cosine == pytest.approx(1.0, abs=1e-12) and result.relative_error < 1e-9
    assert result.norm_ratio == pytest.approx(1.0, abs=1e-9)


def test_audit_flags_an_ascent_direction():
    """With J = -1.5 I, Neumann(1) replaces (I - J)^-1 = I / 2.5 by I + J = -I / 2: the gradient flips."""
    a = -1.5 * torch.eye(4, dtype=torch.float64)
    b, x, c = linear_setup(a)
    result = audit(ik.Neumann(1), a, b, x, c)
    assert not result.descent
    assert result.cosine == pytest.approx(-1.0, abs=1e-9)
    assert result.norm_ratio == pytest.approx(2.5 / 2, abs=1e-9)


def test_audit_works_for_a_deq_module_and_unrolled():
    gen = torch.Generator().manual_seed(2)
    cell = torch.nn.Linear(6, 6).double()
    with torch.no_grad():
        cell.weight.copy_(contraction(6, 0.7, gen))
    deq = ik.DEQ(lambda z, x: torch.tanh(cell(z) + x))
    x = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    result = ik.gradient_audit(
        lambda z: deq.cell(z, x),
        torch.zeros_like(x),
        lambda z: z.square().sum(),
        ik.Unrolled(),
        wrt=list(cell.parameters()),
        solver=ik.FixedPointIteration(tol=1e-12, max_iter=300, stop_mode="abs"),
    )
    assert result.relative_error < 1e-8 and result.descent


def test_audit_needs_tensors_that_require_grad():
    with pytest.raises(ValueError, match="wrt"):
        ik.gradient_audit(torch.tanh, torch.zeros(2, 3), torch.sum, ik.JFB(), wrt=[torch.zeros(3)])


class _Scale(torch.autograd.Function):
    """An old-style custom Function (no setup_context): the kind torch.func transforms refuse."""

    @staticmethod
    def forward(ctx, x):
        return 0.5 * x

    @staticmethod
    def backward(ctx, grad):
        return 0.5 * grad


def test_cells_with_custom_autograd_functions():
    z = torch.randn(2, 3, dtype=torch.float64)
    rho = ik.spectral_radius(lambda v: _Scale.apply(v), z, n_iter=20)
    torch.testing.assert_close(rho, torch.full((2,), 0.5, dtype=torch.float64))
