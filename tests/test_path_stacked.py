"""Path.stacked: every branch in one batched graph, equal to the branches built one at a time."""

from __future__ import annotations

import pytest
import torch
from problems import contraction

import implicitkit as ik

B, D, STEPS = 3, 5, (1, 3, 6)


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = contraction(D, 0.7, gen).requires_grad_()
    x = torch.randn(B, D, generator=gen, dtype=torch.float64, requires_grad=True)
    head = torch.randn(len(STEPS), D, generator=gen, dtype=torch.float64)
    return w, x, head


def solve(w, x, gradient):
    def f(state):
        return {"z": torch.tanh(state["z"] @ w.T + x), "s": 0.5 * state["s"] + state["z"].sum(-1)}

    z0 = {"z": torch.zeros(B, D, dtype=torch.float64), "s": torch.zeros(B, dtype=torch.float64)}
    solver = ik.FixedPointIteration(tol=None, max_iter=6)
    return ik.fixed_point(f, z0, solver=solver, gradient=gradient, capture=STEPS)


def stacked_map(w, x, n):
    xs = x.repeat(n, 1)  # the per-sample input, once per branch

    def f(state):
        return {"z": torch.tanh(state["z"] @ w.T + xs), "s": 0.5 * state["s"] + state["z"].sum(-1)}

    return f


def loss(branches, head):
    return sum(((b["z"] * h).sum() + b["s"].square().sum()) for b, h in zip(branches, head, strict=True))


@pytest.mark.parametrize(
    "gradient", [ik.RAG(k=2), ik.JFB(), ik.Phantom(k=3, tau=0.6), ik.Neumann(k=4), ik.IFT()], ids=repr
)
def test_stacked_branches_equal_branches_one_at_a_time(gradient):
    w, x, head = problem()
    sol = solve(w, x, gradient)
    one_by_one = list(sol.path)
    want = torch.autograd.grad(loss(one_by_one, head), [w, x])
    stacked = sol.path.stacked(stacked_map(w, x, len(STEPS)))
    assert stacked["z"].shape == (len(STEPS) * B, D) and stacked["s"].shape == (len(STEPS) * B,)
    split = [dict(zip(stacked, parts, strict=True)) for parts in zip(*(v.chunk(3) for v in stacked.values()))]
    for got, ref in zip(split, one_by_one, strict=True):
        torch.testing.assert_close(got["z"], ref["z"], rtol=0, atol=1e-14)
        torch.testing.assert_close(got["s"], ref["s"], rtol=0, atol=1e-14)
    got = torch.autograd.grad(loss(split, head), [w, x])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_rag_branch_is_two_refinements_of_the_detached_captured_state():
    """The reference without the library's path machinery: F(F(sg(z_i))) with z_i from explicit iteration."""
    w, x, _ = problem(1)
    stacked = solve(w, x, ik.RAG(k=2)).path.stacked(stacked_map(w, x, len(STEPS)))
    z, s = torch.zeros(B, D, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    with torch.no_grad():
        states = {}
        for step in range(1, 7):
            z, s = torch.tanh(z @ w.T + x), 0.5 * s + z.sum(-1)
            states[step] = (z, s)
    for i, step in enumerate(STEPS):
        z, s = states[step]
        for _ in range(2):
            z, s = torch.tanh(z @ w.T + x), 0.5 * s + z.sum(-1)
        torch.testing.assert_close(stacked["z"][i * B : (i + 1) * B], z, rtol=0, atol=1e-14)
        torch.testing.assert_close(stacked["s"][i * B : (i + 1) * B], s, rtol=0, atol=1e-14)


def test_reversible_and_empty_paths_are_refused():
    w, x, _ = problem()
    sol = ik.fixed_point(
        lambda z: torch.tanh(z @ w.T + x),
        torch.zeros(B, D, dtype=torch.float64),
        solver=ik.FixedPointIteration(tol=None, max_iter=6),
        gradient=ik.Reversible(0.8),
        capture=STEPS,
    )
    with pytest.raises(NotImplementedError, match="index the path one branch at a time"):
        sol.path.stacked(lambda z: z)
    empty = solve(w, x, ik.RAG()).path.__class__((), lambda step: None)
    with pytest.raises(ValueError, match="capture="):
        empty.stacked(lambda z: z)


def iterates(w, x, steps: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The explicit iteration of the problem's map from zero, without the library."""
    z, s = torch.zeros(B, D, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    out = {}
    with torch.no_grad():
        for step in range(1, steps + 1):
            z, s = torch.tanh(z @ w.T + x), 0.5 * s + z.sum(-1)
            out[step] = (z, s)
    return out


@pytest.mark.parametrize("gradient", [ik.RAG(k=2), ik.Unrolled()], ids=repr)
def test_path_states_are_the_captured_iterates_without_the_estimator(gradient):
    w, x, _ = problem(2)
    sol = solve(w, x, gradient)
    want = iterates(w, x, 6)
    states = sol.path.states()
    assert len(states) == len(STEPS)
    for state, step in zip(states, STEPS, strict=True):
        torch.testing.assert_close(state["z"], want[step][0], rtol=0, atol=1e-14)
        torch.testing.assert_close(state["s"], want[step][1], rtol=0, atol=1e-14)
    # A solve without autograd leaves plain tensors; an unrolled one leaves its graph on them.
    assert state["z"].requires_grad == isinstance(gradient, ik.Unrolled)


def test_path_states_of_an_empty_batch_and_of_a_path_without_them():
    w = torch.eye(D, dtype=torch.float64)
    z0 = torch.zeros(0, D, dtype=torch.float64)
    sol = ik.fixed_point(lambda z: z @ w, z0, solver=ik.FixedPointIteration(max_iter=4), capture=(1, 2))
    states = sol.path.states()
    assert len(states) == 2 and all(state.shape == (0, D) for state in states)
    with pytest.raises(NotImplementedError, match="captured states"):
        ik.Path((1,), lambda step: None).states()
