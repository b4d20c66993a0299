"""Forward mode and exact second order through a solve: cost against first-order reverse mode and Unrolled.

Problem: the MLP cell (``_common.MLPCell``, float64) of width 64 (``--quick``: 16), a batch of 16 (``--quick``:
4). Forward solver ``Anderson(tol=1e-10)``; IFT's adjoint and tangent ``Anderson(tol=1e-10)``; Unrolled runs
``FixedPointIteration`` for 400 steps (converged). The loss is ``<c, z*>`` (plus ``||z*||^2`` for the
penalty) for a random ``c``; forward mode gives its derivative along a random ``v``. Each row: thread-CPU time (median of repeats) of the whole call
(solve + differentiation), the activation bytes autograd saved at the peak (not countable under
``torch.func.jvp``), and the relative difference of
the result from the reference named in the last column.

Run: ``.venv/bin/python benchmarks/differentiation_modes.py [--quick]``
"""

from __future__ import annotations

import torch
from _common import (
    SavedActivations,
    base_parser,
    command_line,
    machine,
    make_problem,
    markdown_table,
    setup,
    time_interleaved,
)

import implicitkit as ik

TOL = 1e-10
STEPS = 400  # plain iteration reaches 1e-10 on every sample of the full-size problem within 330 steps


def solve_value(problem, x, gradient, solver=None):
    solver = solver or ik.Anderson(tol=TOL, max_iter=200)
    return ik.fixed_point(lambda z: problem.cell(z, x), problem.z0(), solver=solver, gradient=gradient).value


def candidates(problem, v, c):
    ift = ik.IFT(ik.Anderson(tol=TOL, max_iter=200))
    ift2 = ik.IFT(ik.Anderson(tol=TOL, max_iter=200), second_order=True)
    unrolled, picard = ik.Unrolled(), ik.FixedPointIteration(tol=None, max_iter=STEPS)

    def first_order(gradient, solver=None):
        x = problem.x.clone().requires_grad_()
        (gx,) = torch.autograd.grad((c * solve_value(problem, x, gradient, solver)).sum(), x)
        return (gx * v).sum()  # the directional derivative of <c, z*> along v, as forward mode gives it

    def tangent(gradient, solver=None):
        _, t = torch.func.jvp(lambda x: solve_value(problem, x, gradient, solver), (problem.x,), (v,))
        return (c * t).sum()

    def penalty(gradient, solver=None):
        x = problem.x.clone().requires_grad_()
        z = solve_value(problem, x, gradient, solver)
        (gx,) = torch.autograd.grad((c * z).sum() + z.square().sum(), x, create_graph=True)
        weight = problem.cell.lin1.weight
        (gw,) = torch.autograd.grad(gx.square().sum(), weight)
        return gw

    return {
        "reverse, first order: IFT": (lambda: first_order(ift), "reverse IFT"),
        "reverse, first order: IFT(second_order=True)": (lambda: first_order(ift2), "reverse IFT"),
        "forward (jvp along v): IFT": (lambda: tangent(ift), "reverse IFT"),
        "forward (jvp along v): Unrolled": (lambda: tangent(unrolled, picard), "reverse IFT"),
        "gradient penalty d||dL/dx||^2/dW: IFT(second_order=True)": (lambda: penalty(ift2), "Unrolled"),
        "gradient penalty d||dL/dx||^2/dW: Unrolled": (lambda: penalty(unrolled, picard), "Unrolled"),
    }


def main(argv: list[str] | None = None) -> str:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    width, batch = (16, 4) if args.quick else (64, 16)
    problem = make_problem("mlp", width, batch, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(problem.x.shape, generator=gen, dtype=torch.float64)
    c = torch.randn(problem.x.shape, generator=gen, dtype=torch.float64)
    calls = candidates(problem, v, c)
    results, peaks = {}, {}
    for name, (call, _) in calls.items():
        if name.startswith("forward"):  # torch.func's wrapped tensors have no storage to count
            results[name], peaks[name] = call(), None
            continue
        with SavedActivations(exclude=list(problem.cell.parameters())) as saved:
            results[name] = call()
        peaks[name] = saved.peak_bytes
    refs = {"reverse IFT": results["reverse, first order: IFT"]}
    refs["Unrolled"] = results["gradient penalty d||dL/dx||^2/dW: Unrolled"]
    timings = time_interleaved(
        {n: c for n, (c, _) in calls.items()}, repeats=1 if args.quick else args.repeats
    )
    rows = []
    for name, (_, ref_name) in calls.items():
        ref = refs[ref_name]
        # The gradient penalties keep their graph (create_graph); the comparison needs none.
        result, ref = results[name].detach(), ref.detach()
        diff = float(torch.linalg.vector_norm(result - ref) / torch.linalg.vector_norm(ref))
        rows.append(
            [
                name,
                f"{1e3 * timings[name].cpu_median:.1f}",
                "n/a" if peaks[name] is None else f"{peaks[name] / 1024:.0f}",
                f"{diff:.1e}",
                ref_name,
            ]
        )
    headers = ["differentiation", "ms (CPU)", "saved KiB (peak)", "rel. difference", "from"]
    table = markdown_table(headers, rows)
    text = f"{command_line()}\n\n{machine()}\n\nMLP w={width}, B={batch}, float64\n\n{table}\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "differentiation_modes.md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
