"""``Unrolled(checkpoint_every=k)``: the plain unrolled gradient exactly, with memory for ``steps / k`` states.

The reference is plain ``Unrolled()`` in float64 (itself checked against IFT and dense solves in
``test_gradients.py``): the checkpointed replay must repeat the forward's operations on the same values, so the
two agree to rounding (1e-12), including per-sample stopping, Anderson's and Broyden's memory and the path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from problems import contraction

import implicitkit as ik

B, D = 4, 5


def grads(gradient, solver, *, capture=(), perturbation=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = contraction(D, 0.8, gen).requires_grad_()
    x = torch.randn(B, D, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.randn(B, D, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    sol = ik.fixed_point(
        lambda z: torch.tanh(z @ w.T + x),
        torch.zeros(B, D, dtype=torch.float64),
        solver=solver,
        gradient=gradient,
        capture=capture,
        perturbation=perturbation,
    )
    loss = (c * sol.value).sum() + sum((c * z).square().sum() for z in sol.path)
    return torch.autograd.grad(loss, (w, x)), sol


SOLVERS = {
    "FixedPointIteration (tol)": ik.FixedPointIteration(tol=1e-9, max_iter=60),
    "FixedPointIteration (count)": ik.FixedPointIteration(tol=None, max_iter=23),
    "Anderson": ik.Anderson(tol=1e-10, max_iter=60),
    "Broyden": ik.Broyden(tol=1e-10, max_iter=60),
}


@pytest.mark.parametrize("every", [1, 4, 100])
@pytest.mark.parametrize("solver", list(SOLVERS.values()), ids=list(SOLVERS))
def test_checkpointed_gradient_equals_plain_unrolled(solver, every):
    (ref_w, ref_x), ref = grads(ik.Unrolled(), solver, capture=(2, 7))
    (got_w, got_x), sol = grads(ik.Unrolled(checkpoint_every=every), solver, capture=(2, 7))
    assert torch.equal(sol.stats.nstep, ref.stats.nstep)
    if isinstance(solver, (ik.FixedPointIteration, ik.Anderson)) and solver.tol is not None:
        assert ref.stats.nstep.unique().numel() > 1  # samples stop at different steps: masks are replayed
    assert torch.allclose(got_w, ref_w, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got_x, ref_x, rtol=1e-12, atol=1e-14)


def test_path_backward_retains_the_checkpointed_graph_for_the_value():
    """``Path.backward`` back-propagates branch by branch (retaining the shared unrolled graph), then the value."""
    solver = ik.FixedPointIteration(tol=None, max_iter=10)
    got = []
    for every in (None, 3):
        gen = torch.Generator().manual_seed(0)
        w = contraction(D, 0.8, gen).requires_grad_()
        x = torch.randn(B, D, generator=gen, dtype=torch.float64)
        sol = ik.fixed_point(
            lambda z, w=w, x=x: torch.tanh(z @ w.T + x),
            torch.zeros(B, D, dtype=torch.float64),
            solver=solver,
            gradient=ik.Unrolled(checkpoint_every=every),
            capture=(2, 5, 8),
        )
        sol.path.backward(lambda z: z.square().sum())
        sol.value.sum().backward()
        got.append(w.grad)
    assert torch.allclose(got[0], got[1], rtol=1e-12, atol=1e-14)


def test_perturbation_from_the_global_generator_is_replayed_one_of_its_own_raises():
    solver = ik.FixedPointIteration(tol=None, max_iter=12)
    pert = ik.GaussianPerturbation(prob=1.0, scale=0.1)
    (ref_w, _), _ = grads(ik.Unrolled(), solver, perturbation=pert)
    (got_w, _), _ = grads(ik.Unrolled(checkpoint_every=5), solver, perturbation=pert)
    assert torch.allclose(got_w, ref_w, rtol=1e-12, atol=1e-14)
    own = ik.GaussianPerturbation(prob=1.0, scale=0.1, generator=torch.Generator().manual_seed(0))
    with pytest.raises(
        RuntimeError, match=r"Replaying solver steps 11-12 .*different state.*torch.Generator"
    ):
        grads(ik.Unrolled(checkpoint_every=5), solver, perturbation=own)


def test_second_derivative_through_checkpoints_is_exact():
    """``d2(sum z*)/(da db)`` of ``z = a tanh(b z) + x`` from 300 explicit iterations: -0.00262."""
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([[0.3], [-0.8]], dtype=torch.float64)
    z = torch.zeros_like(x)
    for _ in range(300):
        z = a * torch.tanh(b * z) + x
    (ga,) = torch.autograd.grad(z.sum(), a, create_graph=True)
    (want,) = torch.autograd.grad(ga, b)
    sol = ik.fixed_point(
        lambda s: a * torch.tanh(b * s) + x,
        torch.zeros_like(x),
        solver=ik.FixedPointIteration(tol=None, max_iter=300),
        gradient=ik.Unrolled(checkpoint_every=7),
    )
    (ga,) = torch.autograd.grad(sol.value.sum(), a, create_graph=True)
    (got,) = torch.autograd.grad(ga, b)
    assert torch.allclose(got, want, rtol=1e-12) and abs(float(got) + 0.00262) < 5e-6


@pytest.mark.parametrize("bad", [0, -2])
def test_checkpoint_every_must_be_a_positive_step_count(bad):
    with pytest.raises(ValueError, match="checkpoint_every must be a positive number of steps"):
        ik.Unrolled(checkpoint_every=bad)
    # fractions and bools are refused as every count is (test_solvers), numpy integers accepted
    assert ik.Unrolled(checkpoint_every=np.int64(3)).checkpoint_every == 3


CHILD = """
import torch
import implicitkit as ik
import torch._dynamo  # checkpointing imports it on first use: code, not memory the solve holds
torch.set_num_threads(1)
x = torch.randn(256, 2048, generator=torch.Generator().manual_seed(0))
w = torch.ones(2048, requires_grad=True)
f = lambda z: 0.9 * torch.tanh(z * w) + x
f(x)


def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))


for every in (10, None):
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
    base = kib("VmRSS")
    sol = ik.fixed_point(f, torch.zeros_like(x), solver=ik.FixedPointIteration(tol=None, max_iter=100),
                         gradient=ik.Unrolled(checkpoint_every=every))
    sol.value.sum().backward()
    del sol
    print((kib("VmHWM") - base) / 1024)
"""


def test_peak_rss_of_100_steps_drops_with_checkpoints():
    """A state is 2 MiB: plain unrolling keeps two per step (about 400 MiB), every 10 steps about 10 + 10."""
    # Large blocks straight from mmap: glibc's default heap can keep freed state-sized blocks pinned by the
    # graph's small allocations between them, which hides the saving from RSS (see docs/benchmarks.md).
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    checkpointed, plain = (float(line) for line in out.stdout.split())
    assert checkpointed < plain / 3, f"peak RSS {plain:.0f} MiB plain, {checkpointed:.0f} MiB checkpointed"
