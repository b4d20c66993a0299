"""The solvers' own cost per step, outside the calls of ``f``: operations counted, and CPU time.

On a CPU every tensor operation, however small, costs microseconds of dispatch and allocation, so the share
of a solve spent outside ``f`` is set by how many operations a solver runs per step. This script counts
them with the PyTorch profiler (top-level ATen operations per step, minus those of ``f``: a number that does
not depend on the machine's load) and times them (thread-CPU medians) on the 256-wide MLP cell of
``benchmarks/solvers.py`` at batch 64, for a solve with a tolerance (the stopping path, one host read per
step) and a fixed count (``tol=None``, no host read).

Run: ``.venv/bin/python benchmarks/solver_overhead.py [--width 256] [--batch 64] [--repeats 15]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import make_problem, markdown_table
from torch.profiler import ProfilerActivity, profile

import implicitkit as ik

SOLVERS = (ik.FixedPointIteration, ik.Anderson, ik.Broyden)


def ops_per_step(solver_cls, tol, problem, f_ops: int) -> float:
    """Top-level ATen operations per step outside ``f``: the difference between a 20- and a 10-step solve."""
    counts = []
    for steps in (10, 20):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            solver_cls(tol=tol, max_iter=steps).solve(problem.f, torch.zeros_like(problem.x))
        counts.append(sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None))
    return (counts[1] - counts[0]) / 10 - f_ops


def time_per_step(solver_cls, tol, problem, steps: int, repeats: int) -> tuple[float, float]:
    """Median thread-CPU µs per step of the whole solve and of the calls of ``f``."""
    inside = [0.0]

    def timed_f(z):
        start = time.thread_time()
        out = problem.f(z)
        inside[0] += time.thread_time() - start
        return out

    totals, fs = [], []
    for _ in range(repeats + 2):
        inside[0] = 0.0
        start = time.thread_time()
        with torch.no_grad():
            solver_cls(tol=tol, max_iter=steps).solve(timed_f, torch.zeros_like(problem.x))
        totals.append(time.thread_time() - start)
        fs.append(inside[0])
    total, f_time = statistics.median(totals[2:]), statistics.median(fs[2:])
    return 1e6 * total / steps, 1e6 * f_time / steps


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = make_problem("mlp", args.width, args.batch, seed=0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        problem.f(problem.x)
    f_ops = sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)
    rows = []
    for solver_cls in SOLVERS:
        for label, tol in (("tol 1e-30 (stops per sample)", 1e-30), ("tol=None (fixed count)", None)):
            ops = ops_per_step(solver_cls, tol, problem, f_ops)
            total, inside = time_per_step(solver_cls, tol, problem, args.steps, args.repeats)
            outside = total - inside
            rows.append(
                [
                    solver_cls.__name__,
                    label,
                    f"{ops:.1f}",
                    f"{total:.0f}",
                    f"{outside:.0f}",
                    f"{100 * outside / total:.0f}%",
                ]
            )
    print(f"MLP w={args.width}, batch {args.batch}, {args.steps} steps; f runs {f_ops} operations per call\n")
    headers = ["solver", "solve", "ops per step outside f", "µs per step", "µs outside f", "share outside f"]
    print(markdown_table(headers, rows))
    return rows


if __name__ == "__main__":
    main()
