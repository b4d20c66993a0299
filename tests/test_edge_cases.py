"""Inputs at the edges: empty batches, vmap, frozen cells, dict key order, fallbacks that must not raise."""

from __future__ import annotations

import pytest
import torch

import implicitkit as ik


@pytest.mark.parametrize("gradient", [ik.IFT(), ik.JFB(), ik.RAG(), ik.Unrolled()])
def test_empty_batch_returns_an_empty_solution(gradient):
    calls = []

    def f(z):
        calls.append(1)
        return 0.5 * z

    sol = ik.fixed_point(f, torch.zeros(0, 3), gradient=gradient, capture=(1, 2))
    assert sol.value.shape == (0, 3) and sol.last.shape == (0, 3) and sol.path[1].shape == (0, 3)
    assert sol.stats.nstep.shape == (0,) and sol.stats.all_converged and not calls
    assert "empty batch" in sol.stats.summary()


@pytest.mark.parametrize("solver", [ik.FixedPointIteration(), ik.Anderson(), ik.Broyden()], ids=repr)
def test_samples_without_elements_are_solved_in_zero_steps(solver):
    """Zero queries per image: every leaf is empty past the batch (the norms once failed on it)."""
    state = {"content": torch.zeros(2, 0, 16), "boxes": torch.zeros(2, 0, 4)}
    sol = ik.fixed_point(lambda s: {k: 0.5 * v for k, v in s.items()}, state, solver=solver, capture=(1,))
    assert sol.value["content"].shape == (2, 0, 16) and sol.path[0]["boxes"].shape == (2, 0, 4)
    assert sol.stats.nstep.tolist() == [0, 0] and sol.stats.all_converged
    assert sol.stats.trace.shape == (0, 2)


def test_vmap_is_refused_with_the_alternative():
    def solve(x):
        return ik.fixed_point(lambda z: 0.5 * z + x, torch.zeros_like(x)).value

    with pytest.raises(RuntimeError, match=r"vmap.*batch\) dimension"):
        torch.func.vmap(solve)(torch.randn(4, 3))


def test_ift_skips_the_adjoint_for_a_frozen_cell(gen):
    cell = torch.nn.Linear(4, 4).requires_grad_(False)
    x = torch.randn(3, 4, generator=gen)
    head = torch.nn.Parameter(torch.ones(4))
    seen = []
    sol = ik.fixed_point(
        lambda z: torch.tanh(0.5 * cell(z) + x), torch.zeros_like(x), gradient=ik.IFT(callback=seen.append)
    )
    (sol.value * head).sum().backward()
    assert head.grad is not None and seen == [] and sol.backward_stats == []


def test_ift_still_solves_when_only_the_input_needs_a_gradient(gen):
    cell = torch.nn.Linear(4, 4).requires_grad_(False)
    x = torch.randn(3, 4, generator=gen, requires_grad=True)
    sol = ik.fixed_point(lambda z: torch.tanh(0.5 * cell(z) + x), torch.zeros_like(x))
    sol.value.sum().backward()
    assert x.grad is not None and len(sol.backward_stats) == 1


def test_dict_returned_with_keys_in_another_order_is_the_same_structure(gen):
    a, b = torch.randn(2, 3, generator=gen), torch.randn(2, 5, generator=gen)

    def f(state):
        return {"b": 0.5 * state["b"] + b, "a": 0.5 * state["a"] + a}  # keys reversed

    sol = ik.fixed_point(f, {"a": torch.zeros(2, 3), "b": torch.zeros(2, 5)}, solver=ik.Anderson(tol=1e-6))
    assert list(sol.value) == ["a", "b"]
    torch.testing.assert_close(sol.value["a"], 2 * a, atol=1e-4, rtol=0)
    torch.testing.assert_close(sol.value["b"], 2 * b, atol=1e-4, rtol=0)


def test_a_different_key_set_is_still_refused():
    with pytest.raises(ValueError, match="different structure"):
        ik.fixed_point(lambda s: {"a": s["a"], "c": s["b"]}, {"a": torch.zeros(2, 1), "b": torch.zeros(2, 1)})


def test_throwing_adjoint_solver_falls_back_instead_of_raising(gen):
    w = torch.nn.Parameter(0.95 * torch.eye(3, dtype=torch.float64))
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    adjoint = ik.Anderson(tol=1e-14, max_iter=2, throw=True, stop_mode="abs")
    sol = ik.fixed_point(
        lambda z: z @ w.T + x,
        torch.zeros_like(x),
        solver=ik.Anderson(tol=1e-10, max_iter=100, stop_mode="abs"),
        gradient=ik.IFT(adjoint, on_failure=ik.JFB()),
    )
    sol.value.sum().backward()
    (stats,) = sol.backward_stats
    assert isinstance(stats, ik.AdjointStats) and stats.fallback == "JFB" and stats.fell_back.all()
    torch.testing.assert_close(
        w.grad, torch.ones(3, 1, dtype=torch.float64) @ sol.value.detach().sum(0, keepdim=True)
    )


def test_solution_is_a_pytree_and_a_dataclass(gen):
    import dataclasses

    from torch.utils import _pytree as pytree

    x = torch.randn(2, 3, generator=gen, requires_grad=True)
    sol = ik.fixed_point(lambda z: 0.5 * z + x, torch.zeros_like(x))
    leaves, spec = pytree.tree_flatten(sol)
    assert len(leaves) == 2 and leaves[0] is sol.value and dataclasses.is_dataclass(sol)
    rebuilt = pytree.tree_unflatten([t * 2 for t in leaves], spec)
    torch.testing.assert_close(rebuilt.value, 2 * sol.value)
    assert rebuilt.stats is sol.stats


@pytest.mark.parametrize(
    ("z0", "error", "message"),
    [
        (
            torch.zeros(2, 3, dtype=torch.int64),
            TypeError,
            r"Leaf 0 of the state z0 is torch.int64: .* z0.float\(\)",
        ),
        (torch.zeros(2, 3, dtype=torch.complex64), TypeError, r"complex ones are not supported"),
    ],
    ids=["integer", "complex"],
)
def test_a_state_that_cannot_be_solved_is_named_at_the_start(z0, error, message):
    """An integer z0 was blamed on the cell ('the cell returned state leaf 0 in torch.int64 ... return
    torch.int64'). (A meta state stays allowed: the tests solve on it to prove a fixed count reads nothing.)"""
    with pytest.raises(error, match=message):
        ik.fixed_point(lambda z: z, z0)
