"""``DEQ``: wrapping an ordinary module, gradients to parameters and inputs, train/eval behaviour."""

from __future__ import annotations

import torch
from torch import nn

import implicitkit as ik


class ConvCell(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        with torch.no_grad():
            self.conv.weight.mul_(0.2)

    def forward(self, z, x):
        return self.norm(torch.relu(self.conv(z) + x))


def test_conv_cell_converges_and_gradients_reach_params_and_inputs():
    torch.manual_seed(0)
    deq = ik.DEQ(ConvCell(), solver=ik.Anderson(tol=1e-5, max_iter=60), gradient=ik.IFT())
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    z, stats = deq(torch.zeros_like(x), x)
    assert z.shape == x.shape
    assert stats.converged.all(), stats
    z.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in deq.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_perturbation_only_in_training_mode():
    calls = []

    def perturbation(z, step):
        calls.append(step)
        return z

    deq = ik.DEQ(
        lambda z, x: 0.5 * z + x,
        solver=ik.FixedPointIteration(tol=None, max_iter=3),
        perturbation=perturbation,
    )
    x = torch.randn(2, 3)
    deq.train()
    deq(torch.zeros_like(x), x)
    assert calls == [1, 2, 3]
    deq.eval()
    deq(torch.zeros_like(x), x)
    assert calls == [1, 2, 3]


def test_solution_unpacks_and_reprs():
    deq = ik.DEQ(lambda z, x: 0.5 * z + x, solver=ik.Anderson(tol=1e-6))
    sol = deq(torch.zeros(2, 3), torch.ones(2, 3))
    value, _stats = sol
    assert torch.allclose(value, torch.full((2, 3), 2.0), atol=1e-5)
    assert "converged 2/2" in repr(sol)
    assert "Anderson" in repr(deq)
