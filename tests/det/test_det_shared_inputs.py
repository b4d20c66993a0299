"""``SharedInputs.take_gradients``: what the detectors' branch-wise training hands to its one last backward."""

from __future__ import annotations

import torch

import implicitkit as ik


def test_taken_gradients_sent_upstream_equal_one_backward_of_the_summed_losses():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64, generator=gen)

    def losses(features: list[torch.Tensor]) -> list[torch.Tensor]:
        return [features[0].tanh().sum(), (features[0] * features[1]).square().sum()]

    # The reference: one backward of the summed losses through the shared features.
    features = [x @ weight, (x @ weight).sin()]
    (want,) = torch.autograd.grad(sum(losses(features)), weight)

    features = [x @ weight, (x @ weight).sin(), torch.ones(2)]  # a constant passes through
    shared = ik.SharedInputs(features)
    (copies,) = shared.inputs
    assert copies[2] is features[2]
    for loss in losses(copies):
        loss.backward()  # each stops at the copies
    assert weight.grad is None
    sources, grads = shared.take_gradients()
    assert [s is f for s, f in zip(sources, features[:2])] == [True, True] and len(grads) == 2
    assert all(c.grad is None for c in copies[:2])  # taken once
    torch.autograd.backward(sources, grads)
    torch.testing.assert_close(weight.grad, want, rtol=1e-12, atol=1e-12)
    assert shared.take_gradients() == ([], [])
