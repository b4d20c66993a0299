"""Process memory does not grow with solver steps: peak RSS of fresh processes at 10 and 100 steps.

The histories the loop keeps per step used to be small tensors allocated between large state temporaries;
they fragmented the heap and a no-grad solve of ``B = 512``, ``D = 2048`` grew by hundreds of MiB from 10 to
100 steps. The full table (every solver and estimator, a matmul cell) is ``benchmarks/solver_memory.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, resource, sys, torch
import implicitkit as ik
torch.set_num_threads(1)
solver, estimator, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.randn(512, 2048, generator=torch.Generator().manual_seed(0))
w = torch.ones(2048, requires_grad=True)
f = lambda z: 0.9 * torch.tanh(z * w) + x
f(x)
base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
sol = ik.fixed_point(f, torch.zeros_like(x), solver=getattr(ik, solver)(tol=1e-30, max_iter=steps),
                     gradient=getattr(ik, estimator)())
sol.value.sum().backward()
assert int(sol.stats.nstep.max()) == steps
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20)
"""


def peak_mib(solver: str, estimator: str, steps: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, solver, estimator, str(steps)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("solver, estimator", [("FixedPointIteration", "JFB"), ("Anderson", "IFT")])
def test_peak_rss_is_flat_from_10_to_100_steps(solver, estimator):
    short, long = peak_mib(solver, estimator, 10), peak_mib(solver, estimator, 100)
    # A state is 4 MiB; the run-to-run spread of glibc's heap is a few of them. Before the fix: +100-700 MiB.
    assert long - short < 48, f"peak RSS {short:.0f} MiB at 10 steps, {long:.0f} MiB at 100"
