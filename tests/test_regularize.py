"""Hutchinson's Jacobian Frobenius norm against dense Jacobians, in value and in gradient."""

from __future__ import annotations

import pytest
import torch

import implicitkit as ik


def dense_jacobians(f, z):
    """Per-sample dense Jacobians ``J_b`` of a batched map, each sample run with its own batch row."""
    jacs = []
    for b in range(z.shape[0]):
        jacs.append(
            torch.autograd.functional.jacobian(
                lambda v, b=b: f(z.index_copy(0, torch.tensor([b]), v[None]))[b], z[b]
            )
        )
    return jacs


def tanh_map(seed=0, dim=6, batch=4):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5).requires_grad_()
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    return w, x, z


def test_unbiased_per_sample_against_the_dense_norm():
    w, x, z = tanh_map()

    def f(v):
        return torch.tanh(v @ w.T + x)

    jacs = dense_jacobians(f, z)
    exact = torch.stack([j.square().sum() for j in jacs])
    n = 4000
    est = ik.jacobian_frobenius(
        f, z, n_samples=n, reduction="none", generator=torch.Generator().manual_seed(0)
    )
    # Var ||eps^T J||^2 = 2 ||J J^T||_F^2 for Gaussian probes: allow 4 standard errors.
    std_err = torch.stack([(2 * (j @ j.T).square().sum() / n).sqrt() for j in jacs])
    assert ((est - exact).abs() < 4 * std_err).all(), (est, exact, std_err)
    assert std_err.max() < 0.1 * exact.min()  # the test can tell a wrong scale apart


def test_gradient_is_unbiased_for_a_linear_map():
    """For f(z) = A z, ||J||_F^2 = ||A||_F^2 and its gradient is 2A; the mean estimate's gradient tends to it."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.zeros(256, 5, dtype=torch.float64)
    loss = ik.jacobian_frobenius(lambda v: v @ a.T, z, n_samples=16, generator=gen)
    (grad,) = torch.autograd.grad(loss, a)
    assert loss.requires_grad
    torch.testing.assert_close(loss, a.detach().square().sum(), atol=0, rtol=0.1)
    torch.testing.assert_close(grad, 2 * a.detach(), atol=0.25 * a.detach().abs().max(), rtol=0)


def test_reduction_normalize_and_monitoring_mode():
    w, x, z = tanh_map()

    def f(v):
        return torch.tanh(v @ w.T + x)

    def est(**kw):
        return ik.jacobian_frobenius(f, z, generator=torch.Generator().manual_seed(3), **kw)

    per_sample = est(reduction="none")
    assert per_sample.shape == (4,)
    torch.testing.assert_close(est(), per_sample.mean())
    torch.testing.assert_close(est(reduction="sum"), per_sample.sum())
    torch.testing.assert_close(est(reduction="none", normalize=True), per_sample / 6)
    with torch.no_grad():
        monitored = est()
    assert not monitored.requires_grad and est().requires_grad
    torch.testing.assert_close(monitored, est().detach())


def test_structured_state_uses_the_whole_jacobian():
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(5, 5, generator=gen, dtype=torch.float64)

    def f(state):
        a, b = state
        out = torch.cat([a, b.flatten(1)], dim=1) @ m.T
        return out[:, :1], out[:, 1:].reshape(-1, 2, 2)

    z = (torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 2, 2, dtype=torch.float64))
    est = ik.jacobian_frobenius(f, z, n_samples=3000, generator=gen, reduction="none")
    exact = m.square().sum()
    se = (2 * (m @ m.T).square().sum() / 3000).sqrt()
    assert ((est - exact).abs() < 4 * se).all()


def test_a_map_that_ignores_z_has_zero_jacobian():
    x = torch.randn(3, 4)
    assert ik.jacobian_frobenius(lambda z: x.clone(), torch.zeros(3, 4), reduction="none").eq(0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"n_samples": 0}, "n_samples"), ({"reduction": "max"}, "reduction")]
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ik.jacobian_frobenius(torch.tanh, torch.zeros(2, 3), **kwargs)
