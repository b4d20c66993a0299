"""Path supervision: captured states, per-branch backward with shared inputs, and its memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from problems import contraction
from torch import nn

import implicitkit as ik

STEPS = (1, 3, 6, 9, 12, 20)


class Model(nn.Module):
    """An encoder shared by every branch (the "backbone") and a DEQ cell reading its features."""

    def __init__(self, seed: int = 0, dim: int = 8):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.encoder = nn.Linear(dim, dim).double()
        self.w = nn.Parameter(contraction(dim, 0.7, gen))
        self.head = nn.Linear(dim, 1).double()
        with torch.no_grad():  # the same weights in every instance, whatever the global seed
            for p in (*self.encoder.parameters(), *self.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / dim**0.5)
        self.x = torch.randn(4, dim, generator=gen, dtype=torch.float64)

    def cell(self, z, feats):
        return torch.tanh(z @ self.w.T + feats)

    def loss(self, z):
        return self.head(z).square().mean()


def solve(model, feats, estimator, steps=STEPS):
    deq = ik.DEQ(model.cell, solver=ik.FixedPointIteration(tol=None, max_iter=20), gradient=estimator)
    return deq(torch.zeros_like(feats), feats, capture=steps)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def one_graph_grads(estimator, steps=STEPS):
    """The reference: every loss in one graph, one backward."""
    model = Model()
    feats = model.encoder(model.x)
    sol = solve(model, feats, estimator, steps)
    total = model.loss(sol.value) + sum(model.loss(z) for z in sol.path)
    total.backward()
    return grads(model)


def per_branch_grads(estimator, steps=STEPS):
    """The memory-lean way: each branch back-propagated at once, into leaf copies of the features."""
    model = Model()
    feats = model.encoder(model.x)
    shared = ik.SharedInputs(feats)
    sol = solve(model, *shared.inputs, estimator, steps)
    sol.path.backward(model.loss)
    model.loss(sol.value).backward()
    shared.backward()
    return grads(model)


@pytest.mark.parametrize(
    "estimator",
    [ik.RAG(2), ik.JFB(), ik.Phantom(3, 0.5), ik.IFT(), ik.Unrolled()],
    ids=lambda e: type(e).__name__,
)
def test_branches_give_the_gradient_of_one_big_graph(estimator):
    want, got = one_graph_grads(estimator), per_branch_grads(estimator)
    assert set(got) == {"encoder.weight", "encoder.bias", "w", "head.weight", "head.bias"} == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-12, rtol=1e-10, msg=name)


def test_without_shared_inputs_the_second_branch_cannot_reach_the_encoder():
    """Why SharedInputs exists: the first branch's backward frees the encoder's graph."""
    model = Model()
    sol = solve(model, model.encoder(model.x), ik.RAG(2))
    model.loss(sol.path[0]).backward()
    with pytest.raises(RuntimeError, match="second time"):
        model.loss(sol.path[1]).backward()
    # Path.backward, which runs exactly that loop, names the fix instead of suggesting retain_graph.
    sol = solve(model, model.encoder(model.x), ik.RAG(2))
    with pytest.raises(
        RuntimeError, match=r"already freed: an input of the map carries its own graph .*SharedInputs"
    ):
        sol.path.backward(model.loss)


def test_captured_states_are_the_iterates():
    model = Model()
    feats = model.encoder(model.x).detach()
    sol = solve(model, feats, ik.IFT())
    assert sol.path.steps == STEPS and len(sol.path) == len(STEPS)
    z = torch.zeros_like(feats)
    iterates = {}
    with torch.no_grad():
        for k in range(1, max(STEPS) + 1):
            z = model.cell(z, feats)
            iterates[k] = z
    for step, state in zip(STEPS, sol.path, strict=True):
        torch.testing.assert_close(state, iterates[step], atol=0, rtol=0)
    torch.testing.assert_close(sol.path[-1], iterates[20], atol=0, rtol=0)
    assert [s.shape for s in sol.path[1:3]] == [feats.shape] * 2


def test_branches_are_built_fresh_on_each_access():
    model = Model()
    sol = solve(model, model.encoder(model.x).detach(), ik.RAG(2))
    first, again = sol.path[0], sol.path[0]
    assert first is not again and first.grad_fn is not again.grad_fn


def test_weights_scale_each_branch():
    model = Model()
    feats = model.encoder(model.x).detach()
    sol = solve(model, feats, ik.JFB(), steps=(2, 5))
    losses = sol.path.backward(model.loss, weights=[0.5, 2.0])
    got = model.w.grad.clone()
    model.w.grad = None
    sol = solve(model, feats, ik.JFB(), steps=(2, 5))
    (0.5 * model.loss(sol.path[0]) + 2.0 * model.loss(sol.path[1])).backward()
    torch.testing.assert_close(got, model.w.grad, atol=1e-14, rtol=1e-12)
    assert losses.shape == (2,) and not losses.requires_grad
    with pytest.raises(ValueError, match="2 captured steps"):
        sol.path.backward(model.loss, weights=[1.0])


def test_branches_follow_the_grad_mode_at_access():
    model = Model()
    sol = solve(model, model.encoder(model.x).detach(), ik.RAG(2))
    with torch.no_grad():
        assert not any(z.requires_grad for z in sol.path)
    assert all(z.requires_grad for z in sol.path)


def test_branch_loss_without_graph_is_a_clear_error():
    model = Model()
    sol = solve(model, model.encoder(model.x), ik.RAG(2))
    with pytest.raises(RuntimeError, match="has no graph"):
        sol.path.backward(lambda z: z.detach().sum())
    with pytest.raises(ValueError, match="scalar"):
        sol.path.backward(lambda z: z)


def test_shared_inputs_reject_a_loss_that_reaches_the_copies():
    model = Model()
    shared = ik.SharedInputs(model.encoder(model.x))
    (feats,) = shared
    with pytest.raises(RuntimeError, match=r"Call loss.backward\(\) on losses computed from the copies"):
        shared.backward(model.loss(torch.tanh(feats)))


def test_shared_inputs_keep_structure_and_pass_constants():
    a = torch.randn(2, 3, requires_grad=True) * 2
    b = torch.randn(2, 3)
    shared = ik.SharedInputs({"a": a, "b": b}, 7)
    copies, seven = shared.inputs
    assert seven == 7 and copies["b"] is b
    assert copies["a"].is_leaf and copies["a"].requires_grad and copies["a"] is not a
    (copies["a"] * 3).sum().backward()
    shared.backward()  # sends 3 to a's graph; a second call sends nothing more
    shared.backward()
    assert copies["a"].grad is None


def peak_graph_bytes(n_branches: int, per_branch: bool) -> tuple[int, int]:
    model = Model(dim=64)
    model.x = torch.randn(32, 64, dtype=torch.float64)
    steps = STEPS[:n_branches]
    with ik.GraphMemory() as mem:
        feats = model.encoder(model.x)
        if per_branch:
            shared = ik.SharedInputs(feats)
            sol = solve(model, *shared.inputs, ik.RAG(2), steps=steps)
            sol.path.backward(model.loss)
            model.loss(sol.value).backward()
            shared.backward()
        else:
            sol = solve(model, feats, ik.RAG(2), steps=steps)
            (model.loss(sol.value) + sum(model.loss(z) for z in sol.path)).backward()
        del sol
    return mem.peak_bytes, mem.live_bytes


def test_peak_graph_memory_does_not_grow_with_branches():
    one, live = peak_graph_bytes(1, per_branch=True)
    six, _ = peak_graph_bytes(6, per_branch=True)
    assert live == 0, "every graph should be freed after the backward passes"
    assert six == one
    # the measurement is sensitive: one big graph holds every branch at once
    one_graph_six, _ = peak_graph_bytes(6, per_branch=False)
    assert one_graph_six > 2 * six


def test_memory_benchmark_runs_small():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import path_memory

    table = path_memory.main(["--batch", "2", "--queries", "5", "--channels", "16"])
    assert len({per for _, per in table.values()}) == 1  # flat in the number of branches
    assert table[6][0] > table[1][0]
