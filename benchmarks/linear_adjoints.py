"""IFT's adjoint as a fixed point (``u = u J + g``) against linear solvers of ``u (I - J) = g``.

Problems: ``f(z) = z A^T + x`` with ``D = 256`` (``--quick``: 32) and ``A = Q diag(lambda) Q^T`` chosen so the
spectral radius is 0.98 or 0.999 (the fixed-point adjoint converges, slowly), or so one eigenvalue is -1.6 or
a complex pair has modulus 1.3 (``I - A`` is invertible, but ``u -> u A + g`` diverges). The forward solve
starts at the exact fixed point, so only the adjoint differs. Each cell: the adjoint's products with ``J``
(mean over the batch), thread-CPU time of the backward (median of repeats), samples solved, and the relative
error of ``dL/dx`` against a float64 dense solve.

Run: ``.venv/bin/python benchmarks/linear_adjoints.py [--quick]``
"""

from __future__ import annotations

import math

import torch
from _common import base_parser, command_line, machine, markdown_table, setup, time_interleaved

import implicitkit as ik


def problem(kind: str, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``A`` ``[D, D]`` (float64) with the spectrum named by ``kind``."""
    q = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))[0]
    eigs = torch.empty(dim, dtype=torch.float64).uniform_(-0.5, 0.9, generator=gen)
    block = torch.diag(eigs)
    if kind.startswith("radius"):
        block[0, 0] = float(kind.split()[1])
    elif kind == "eigenvalue -1.6":
        block[0, 0] = -1.6
    else:  # a complex pair of modulus 1.3 at 60 degrees
        c, s = 1.3 * math.cos(math.pi / 3), 1.3 * math.sin(math.pi / 3)
        block[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return q @ block @ q.T


def adjoint_solvers(dim: int) -> dict[str, ik.Solver | ik.LinearSolver]:
    tol, budget = 1e-8, 20 * dim
    return {
        "fixed point: FixedPointIteration": ik.FixedPointIteration(tol=tol, max_iter=budget),
        "fixed point: Anderson(m=5)": ik.Anderson(tol=tol, max_iter=budget),
        "GMRES(restart=30)": ik.GMRES(tol=tol, max_iter=budget, restart=30),
        "CG (normal equations)": ik.CG(tol=tol, max_iter=budget),
        "DirectSolve": ik.DirectSolve(tol=tol),
    }


def run(kind: str, dim: int, batch: int, repeats: int) -> list[list[str]]:
    gen = torch.Generator().manual_seed(0)
    a = problem(kind, dim, gen)
    x = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)
    z_star = torch.linalg.solve(eye - a, x.T).T
    exact = torch.linalg.solve((eye - a).T, torch.ones(dim, batch, dtype=torch.float64)).T  # dL/dx = u
    start = ik.FixedPointIteration(tol=None, max_iter=1)
    results, calls = {}, {}
    for name, solver in adjoint_solvers(dim).items():

        def backward(solver=solver, name=name):
            xg = x.clone().requires_grad_()
            sol = ik.fixed_point(
                lambda z: z @ a.T + xg, z_star, solver=start, gradient=ik.IFT(solver, on_failure="report")
            )
            (grad,) = torch.autograd.grad(sol.value.sum(), xg)
            results[name] = (grad, sol.backward_stats[-1])

        calls[name] = backward
    timings = time_interleaved(calls, repeats=repeats)
    rows = []
    for name in calls:
        grad, stats = results[name]
        error = float(torch.linalg.vector_norm(grad - exact) / torch.linalg.vector_norm(exact))
        steps = stats.nstep.double().mean()
        if name == "DirectSolve":  # one solve after D products
            steps = steps * dim
        elif name.startswith("CG"):  # a VJP and a JVP per iteration, one JVP to start, one VJP to check
            steps = 2 * steps + 2
        elif name.startswith("GMRES"):  # and one to check the result (these solves need no restart)
            steps = steps + 1
        rows.append(
            [
                kind,
                name,
                f"{float(steps):.0f}",
                f"{1e3 * timings[name].cpu_median:.1f}",
                f"{int(stats.converged.sum())}/{batch}",
                f"{error:.1e}" if math.isfinite(error) else "nan",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    dim, batch = (32, 4) if args.quick else (256, 8)
    rows = []
    for kind in ("radius 0.98", "radius 0.999", "eigenvalue -1.6", "complex pair 1.3"):
        rows += run(kind, dim, batch, 1 if args.quick else args.repeats)
    headers = [
        "spectrum of J",
        "adjoint solver",
        "products with J (VJP or JVP)",
        "ms (CPU)",
        "solved",
        "rel. error of dL/dx",
    ]
    table = markdown_table(headers, rows)
    text = f"{command_line()}\n\n{machine()}\n\nD = {dim}, B = {batch}, tol 1e-8 (rel)\n\n{table}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear_adjoints.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
