"""Perturbations: the protocol in the solver loop, training-mode only, reproducible, and the Gaussian rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicitkit as ik


class Recorder:
    """A perturbation that changes nothing and records the steps it was called at."""

    def __init__(self):
        self.steps = []

    def __call__(self, state, step):
        self.steps.append(step)
        return state


def cell(z, x):
    return 0.5 * torch.tanh(z) + x


def test_called_before_every_step_from_one():
    rec = Recorder()
    x = torch.randn(3, 4)
    sol = ik.fixed_point(
        lambda z: cell(z, x),
        torch.zeros_like(x),
        solver=ik.FixedPointIteration(max_iter=7, tol=None),
        perturbation=rec,
    )
    assert rec.steps == list(range(1, 8)) and sol.stats.nstep.tolist() == [7, 7, 7]
    assert isinstance(rec, ik.Perturbation) and isinstance(ik.GaussianPerturbation(), ik.Perturbation)


def test_off_in_eval_mode():
    rec = Recorder()
    deq = ik.DEQ(cell, solver=ik.FixedPointIteration(max_iter=5, tol=None), perturbation=rec)
    x = torch.randn(2, 4)
    deq.eval()
    deq(torch.zeros_like(x), x)
    assert rec.steps == []
    deq.train()
    deq(torch.zeros_like(x), x)
    assert rec.steps == [1, 2, 3, 4, 5]


def test_eval_result_equals_an_unperturbed_solve():
    x = torch.randn(2, 4)
    noisy = ik.DEQ(
        cell, solver=ik.Anderson(tol=1e-6), perturbation=ik.GaussianPerturbation(prob=1.0, scale=0.5)
    )
    plain = ik.DEQ(cell, solver=ik.Anderson(tol=1e-6))
    noisy.eval()
    torch.testing.assert_close(
        noisy(torch.zeros_like(x), x).value, plain(torch.zeros_like(x), x).value, atol=0, rtol=0
    )


def perturbed_solve(seed: int):
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(9))
    deq = ik.DEQ(
        cell,
        solver=ik.FixedPointIteration(max_iter=10, tol=None),
        perturbation=ik.GaussianPerturbation(
            prob=0.5, scale=0.3, generator=torch.Generator().manual_seed(seed)
        ),
    )
    return deq(torch.zeros_like(x), x, capture=(3, 10)).path[0].detach()


def test_noise_has_per_element_scale_s_norm_q_as_documented():
    """The reference rule: each noise element has std s ||q||, so the noise vector is sqrt(C) times s ||q||."""
    channels, scale = 256, 0.1
    q = torch.randn(1, 4000, channels, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pert = ik.GaussianPerturbation(prob=1.0, scale=scale, generator=torch.Generator().manual_seed(1))
    noise = pert(q, 1) - (1 - scale) * q
    per_element = noise / (scale * q.norm(dim=-1, keepdim=True))
    assert per_element.std().item() == pytest.approx(1.0, rel=0.01)
    moved = noise.norm(dim=-1) / q.norm(dim=-1)  # how far a step moves each query, relative to its norm
    assert moved.mean().item() == pytest.approx(scale * math.sqrt(channels), rel=0.01)


def test_reproducible_with_a_generator():
    torch.manual_seed(0)
    a = perturbed_solve(1)
    torch.manual_seed(123)  # the global generator plays no part
    b = perturbed_solve(1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, perturbed_solve(2))


def test_the_rule_replayed_with_the_same_generator():
    """One uniform draw decides the step, then eps ~ N(0, I): q <- (1 - s) q + s ||q|| eps, norm per query."""
    q = torch.randn(3, 7, 16, dtype=torch.float64)
    pert = ik.GaussianPerturbation(prob=1.0, scale=0.25, generator=torch.Generator().manual_seed(5))
    out = pert(q, 1)
    replay = torch.Generator().manual_seed(5)
    assert float(torch.rand((), generator=replay)) < 1.0
    eps = torch.randn(q.shape, generator=replay, dtype=q.dtype)
    want = 0.75 * q + 0.25 * q.norm(dim=-1, keepdim=True) * eps
    torch.testing.assert_close(out, want, atol=1e-15, rtol=0)


def test_noise_scale_follows_each_querys_norm():
    q = torch.randn(2, 2, 4096, dtype=torch.float64)
    q[:, 0] *= 1000.0 / q[:, 0].norm(dim=-1, keepdim=True)
    q[:, 1] *= 0.001 / q[:, 1].norm(dim=-1, keepdim=True)
    out = ik.GaussianPerturbation(prob=1.0, scale=1.0, generator=torch.Generator().manual_seed(0))(q, 1)
    per_entry_std = out.std(dim=-1) / q.norm(dim=-1)  # eps has unit std whatever the query's norm
    torch.testing.assert_close(per_entry_std, torch.ones_like(per_entry_std), atol=0.05, rtol=0)


@settings(max_examples=20, deadline=None)
@given(scale=st.floats(1e-3, 1.0), seed=st.integers(0, 100))
def test_perturbation_is_a_convex_mix_of_state_and_noise(scale, seed):
    q = torch.randn(2, 3, 8, dtype=torch.float64)
    out = ik.GaussianPerturbation(prob=1.0, scale=scale, generator=torch.Generator().manual_seed(seed))(q, 1)
    eps = (out - (1 - scale) * q) / (scale * q.norm(dim=-1, keepdim=True))
    assert eps.abs().max() < 8 and 0.3 < eps.std() < 3  # a standard normal draw, recovered


def test_zero_scale_or_probability_is_the_identity():
    q = torch.randn(2, 3, 8)
    assert ik.GaussianPerturbation(prob=1.0, scale=0.0)(q, 1) is q
    assert ik.GaussianPerturbation(prob=0.0, scale=0.5)(q, 1) is q


def test_one_draw_per_step_for_the_whole_batch():
    pert = ik.GaussianPerturbation(prob=0.2, scale=0.1, generator=torch.Generator().manual_seed(0))
    q = torch.ones(4, 3, 8)
    n, hits = 2000, 0
    for step in range(n):
        changed = (pert(q, step) != q).flatten(1).any(dim=1)
        assert changed.all() or not changed.any()
        hits += int(changed.all())
    sigma = math.sqrt(0.2 * 0.8 / n)
    assert abs(hits / n - 0.2) < 4 * sigma


def test_chooses_leaves_of_a_structured_state():
    box, content, other = torch.randn(2, 5, 4), torch.randn(2, 5, 8), torch.randn(2, 3)
    out = ik.GaussianPerturbation(prob=1.0, leaves=1)((box, content, other), 1)
    assert out[0] is box and out[2] is other and not torch.equal(out[1], content)

    state = {"query": {"box": box, "content": content}, "extra": other}
    out = ik.GaussianPerturbation(prob=1.0, leaves=[("query", "content")])(state, 1)
    assert (
        out["query"]["box"] is box
        and out["extra"] is other
        and not torch.equal(out["query"]["content"], content)
    )

    out = ik.GaussianPerturbation(prob=1.0, leaves=["query"])(state, 1)  # a subtree
    assert out["extra"] is other and not torch.equal(out["query"]["box"], box)


def test_a_tuple_of_keys_is_one_path_and_a_list_several_selectors():
    """``(0, 0)`` on ``((content, pos), boxes)`` is the path to content, not index 0 named twice."""
    content, pos, boxes = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    out = ik.GaussianPerturbation(prob=1.0, leaves=(0, 0))(((content, pos), boxes), 1)
    assert out[0][1] is pos and out[1] is boxes and not torch.equal(out[0][0], content)

    state = {"query": {"content": content, "pos": pos}, "boxes": boxes}
    out = ik.GaussianPerturbation(prob=1.0, leaves=("query", "content"))(state, 1)
    assert out["query"]["pos"] is pos and out["boxes"] is boxes
    assert not torch.equal(out["query"]["content"], content)

    out = ik.GaussianPerturbation(prob=1.0, leaves=["boxes", ("query", "pos")])(state, 1)
    assert out["query"]["content"] is content
    assert not torch.equal(out["query"]["pos"], pos) and not torch.equal(out["boxes"], boxes)


def test_unknown_leaf_names_the_available_ones():
    with pytest.raises(ValueError, match=r"names 'contnet'.*\('query', 'content'\)"):
        ik.GaussianPerturbation(leaves="contnet")({"query": {"content": torch.ones(2, 3)}}, 1)


def test_a_leaf_without_feature_dimension_is_refused():
    with pytest.raises(ValueError, match="feature dimension"):
        ik.GaussianPerturbation(prob=1.0)(torch.ones(4), 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prob": 1.5}, "prob"),
        ({"scale": -0.1}, "scale"),
        ({"leaves": []}, r"leaves=\[\] perturbs nothing"),  # was a silent no-op at prob 1
        ({"dim": 0}, "batch dimension"),  # one sample's noise scaled with the others'
        ({"dim": (0, -1)}, "batch dimension"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ik.GaussianPerturbation(**kwargs)


def test_a_norm_that_reaches_the_batch_dimension_of_a_leaf_is_refused():
    perturb = ik.GaussianPerturbation(prob=1.0, dim=-2)  # the queries of [B, N, C], the batch of [B, C]
    assert perturb(torch.ones(2, 5, 4), 1).shape == (2, 5, 4)
    with pytest.raises(ValueError, match=r"batch dimension of a leaf of shape \(2, 4\)"):
        perturb(torch.ones(2, 4), 1)


def test_perturbed_path_is_kept_and_training_still_gets_gradients():
    x = torch.randn(2, 5, 4, requires_grad=True)
    pert = ik.GaussianPerturbation(prob=1.0, scale=0.5, generator=torch.Generator().manual_seed(0))
    deq = ik.DEQ(
        cell, solver=ik.FixedPointIteration(max_iter=4, tol=None), gradient=ik.IFT(), perturbation=pert
    )
    sol = deq(torch.zeros_like(x), x, capture=(2,))
    with torch.no_grad():
        clean = cell(cell(torch.zeros_like(x), x), x)
    assert not torch.allclose(sol.path[0], clean)  # step 2 started from a perturbed state
    sol.value.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
