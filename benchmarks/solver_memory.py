"""Process memory against solver steps, as a user sees it: peak RSS of a fresh process (CPU) or CUDA peak.

Every measurement is its own subprocess: build a contracting map ``z -> tanh(z W^T + x)`` (``B = 512``,
``D = 2048``, ``||W|| = 0.5``), run one solve of exactly ``steps`` steps (``tol`` too tight to reach) with the
given solver and estimator, back-propagate ``value.sum()``, and report the peak resident set size above
the process's RSS just before the solve (CPU), or ``torch.cuda.max_memory_allocated`` above the memory
allocated before it (GPU). The heap's layout varies from process to process by a few state-sized blocks
(4 MiB here), so each cell is the median of ``--repeats`` fresh processes. A DEQ promises that memory does not grow with the solver's steps: the growth
from 10 to 100 steps should be small next to the 10-step figure for every estimator except ``Unrolled``,
which keeps every step's graph by design; ``Unrolled-ckptK`` (``Unrolled(checkpoint_every=K)``) keeps the
loop's state every ``K`` steps and replays the segments in backward. ``Reversible`` (one step is a step of
its pair, two applications of the map) keeps nothing per step; ``Reversible/10`` stores the pair every 10
steps, 2 states each.

Run: ``.venv/bin/python benchmarks/solver_memory.py [--device cuda] [--steps 10 100]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SOLVERS = ("FixedPointIteration", "Anderson", "Broyden")
ESTIMATORS = (
    "IFT",
    "JFB",
    "RAG",
    "Phantom",
    "Neumann",
    "Unrolled",
    "Unrolled-ckpt1",
    "Unrolled-ckpt10",
    "Reversible",
    "Reversible/10",
    "none",
)
# Reversible runs its own iteration and takes only the budget of a plain FixedPointIteration.
REVERSIBLE = ("Reversible", "Reversible/10")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _restart_peak_rss() -> None:
    """Make the kernel's peak RSS (``VmHWM``) start again from the current RSS: ``ru_maxrss`` is the peak of
    the process's whole life, which setting up the problem may already have pushed above the solve's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(solver: str, estimator: str, steps: int, device: str, batch: int, dim: int) -> float:
    """MiB of memory above the pre-solve level at the solve's peak (runs in the child process)."""
    import torch

    import implicitkit as ik

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(dim, dim, generator=gen)
    w = (0.5 * w / torch.linalg.matrix_norm(w, ord=2)).to(device).requires_grad_()
    x = torch.randn(batch, dim, generator=gen).to(device)
    gradients = {
        "IFT": ik.IFT(ik.Anderson(tol=1e-6, max_iter=30)),
        "JFB": ik.JFB(),
        "RAG": ik.RAG(k=2),
        "Phantom": ik.Phantom(k=5, tau=0.5),
        "Neumann": ik.Neumann(k=5),
        "Unrolled": ik.Unrolled(),
        "Unrolled-ckpt1": ik.Unrolled(checkpoint_every=1),
        "Unrolled-ckpt10": ik.Unrolled(checkpoint_every=10),
        "Reversible": ik.Reversible(beta=0.8),
        "Reversible/10": ik.Reversible(beta=0.8, checkpoint_every=10),
        "none": ik.JFB(),
    }

    def f(z):
        return torch.tanh(z @ w.T + x)

    def run():
        sol = ik.fixed_point(
            f, torch.zeros_like(x), solver=getattr(ik, solver)(tol=1e-30, max_iter=steps),
            gradient=gradients[estimator],
        )  # fmt: skip
        if estimator == "none":  # the solve alone, no backward
            return int(sol.stats.nstep.max())
        sol.value.sum().backward()
        return int(sol.stats.nstep.max())

    with torch.no_grad():  # one warm-up application: the BLAS and allocator set up their buffers
        f(x)
    # Checkpointing imports torch._dynamo on its first use: about 150 MiB of code, not memory the solve holds.
    import torch._dynamo

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        taken = run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        _restart_peak_rss()
        taken = run()
        peak = _peak_rss_bytes() - base
    if taken != steps:
        raise RuntimeError(f"{solver} took {taken} steps, not {steps}")
    return peak / 2**20


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS))
    parser.add_argument(
        "--repeats", type=int, default=3, help="fresh processes per cell; the median is shown"
    )
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        solver, estimator, steps = args.child
        print(measure(solver, estimator, int(steps), args.device, args.batch, args.dim))
        return []
    rows = []
    head = "| solver | estimator | " + " | ".join(f"{s} steps (MiB)" for s in args.steps) + " | growth |"
    print(f"peak memory above the pre-solve level, B={args.batch}, D={args.dim}, {args.device}")
    print(head)
    print("|" + "---|" * (3 + len(args.steps)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for solver in args.solvers:
        for estimator in args.estimators:
            if estimator in REVERSIBLE and solver != "FixedPointIteration":
                continue
            mib = []
            for steps in args.steps:
                cmd = [sys.executable, __file__, "--device", args.device, "--batch", str(args.batch)]
                cmd += ["--dim", str(args.dim), "--child", solver, estimator, str(steps)]
                runs = [
                    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                    for _ in range(args.repeats)
                ]
                mib.append(statistics.median(float(r.stdout.strip().splitlines()[-1]) for r in runs))
            growth = (mib[-1] - mib[0]) / mib[0] if mib[0] > 0 else float("inf")
            rows.append({"solver": solver, "estimator": estimator, "steps": args.steps, "mib": mib})
            cells = " | ".join(f"{m:.1f}" for m in mib)
            print(f"| {solver} | {estimator} | {cells} | {100 * growth:+.0f}% |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
