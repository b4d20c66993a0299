"""implicitkit's solvers against torchdeq 0.1.0's, on the same cells, tolerances and inputs.

For each cell and relative tolerance, implicitkit's ``FixedPointIteration``, ``Anderson`` and ``Broyden``
and torchdeq's ``fixed_point_iter``, ``anderson_solver`` and ``broyden_solver`` solve the same batch from
``z0 = 0``, alternating within every repeat. Reported per pair:

- evaluations of ``f`` on the batch (the steps, for both libraries counted by wrapping ``f``);
- wall and thread-CPU time, medians over repeats, and implicitkit's time as a fraction of torchdeq's;
- the final residual under one definition computed here for both results,
  ``r_b = ||f(z_b) - z_b|| / ||f(z_b)||`` at the returned ``z`` (max over the batch);
- the solver's own overhead: time outside the calls of ``f``.

A second part solves a batch of mixed difficulty (inputs scaled from 0.4 to 10: the small ones contract
slowly), where per-sample stopping changes what each sample gets, and the same batch with one NaN sample.

Usage::

    .venv/bin/python benchmarks/solvers.py            # about 3 minutes on 2 cores
    .venv/bin/python benchmarks/solvers.py --quick    # seconds, for the smoke test
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    Problem,
    Report,
    Stopwatch,
    Timing,
    base_parser,
    command_line,
    fmt,
    machine,
    make_problem,
    markdown_table,
    save_figure,
    setup,
    time_interleaved,
)
from torch import Tensor
from torchdeq.solver import get_solver

import implicitkit as ik


# -- the candidates ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One of implicitkit's solvers and torchdeq's counterpart, with the settings they share."""

    name: str
    ours: Callable[[float, int], ik.Solver]
    theirs: str
    theirs_kwargs: dict[str, Any] = field(default_factory=dict)


def pairs(max_iter: int) -> list[Pair]:
    """Equal settings: Anderson with history 5 and lam 1e-4, Broyden keeping every update (memory max_iter)."""

    def ours(cls, **kwargs):
        return lambda tol, n: cls(tol=tol, max_iter=n, stop_mode="rel", **kwargs)

    return [
        Pair("FixedPointIteration", ours(ik.FixedPointIteration), "fixed_point_iter"),
        Pair("Anderson", ours(ik.Anderson, m=5, lam=1e-4), "anderson", dict(m=5, lam=1e-4)),
        Pair("Broyden", ours(ik.Broyden, m=max_iter), "broyden", dict(LBFGS_thres=max_iter)),
    ]


class CountedMap:
    """Wraps ``f``: counts its calls and the time spent inside them."""

    def __init__(self, f: Callable[[Tensor], Tensor]) -> None:
        self.f = f
        self.calls = 0
        self.watch = Stopwatch()

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        with self.watch:
            return self.f(z)

    def reset(self) -> None:
        self.calls = 0
        self.watch.reset()


@dataclass
class Run:
    """One solve: the returned value, evaluations of f, time inside f, and implicitkit's per-sample steps."""

    value: Tensor
    calls: int
    f_wall: float
    f_cpu: float
    nstep: Tensor | None = None


def solve_ours(solver: ik.Solver, problem: Problem, fmap: CountedMap | None = None) -> Run:
    """Run one of implicitkit's solvers through its flat interface (``[B, D]`` states)."""
    shape = problem.x.shape
    fmap = fmap or CountedMap(problem.f)
    flat = solver.solve(lambda z: fmap(z.view(shape)).flatten(1), problem.z0().flatten(1))
    return Run(flat.value.view(shape), fmap.calls, fmap.watch.wall, fmap.watch.cpu, flat.stats.nstep)


def solve_theirs(
    pair: Pair, tol: float, max_iter: int, problem: Problem, fmap: CountedMap | None = None
) -> Run:
    """Run torchdeq's counterpart with the same tolerance, stop mode and step budget."""
    fmap = fmap or CountedMap(problem.f)
    solve = get_solver(pair.theirs)
    value, _, _ = solve(fmap, problem.z0(), max_iter=max_iter, tol=tol, stop_mode="rel", **pair.theirs_kwargs)
    return Run(value, fmap.calls, fmap.watch.wall, fmap.watch.cpu)


def relative_residual(problem: Problem, z: Tensor) -> Tensor:
    """The common residual ``||f(z) - z|| / ||f(z)||`` per sample, at the returned value."""
    with torch.no_grad():
        fz = problem.f(z)
    diff = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
    return diff / torch.linalg.vector_norm(fz.flatten(1), dim=1).clamp_min(1e-30)


# -- one comparison -------------------------------------------------------------------------------------------
@dataclass
class Side:
    """Measurements of one library on one pair: timings, last run, and the time inside f per repeat."""

    timing: Timing
    run: Run
    f_cpu: list[float]
    residual: Tensor

    @property
    def overhead(self) -> float:
        """Median fraction of the solve's CPU time spent outside f."""
        return statistics.median((t - f) / t for t, f in zip(self.timing.cpu, self.f_cpu))


@dataclass
class Comparison:
    problem: str
    tol: float
    pair: str
    ours: Side
    theirs: Side

    @property
    def wall_ratio(self) -> float:
        return self.ours.timing.wall_median / self.theirs.timing.wall_median

    @property
    def cpu_ratio(self) -> float:
        return self.ours.timing.cpu_median / self.theirs.timing.cpu_median


def compare(pair: Pair, problem: Problem, tol: float, max_iter: int, repeats: int) -> Comparison:
    """Time implicitkit's and torchdeq's solver alternately on the same problem and tolerance."""
    runs: dict[str, list[Run]] = {"ours": [], "theirs": []}
    solver = pair.ours(tol, max_iter)
    candidates = {
        "ours": lambda: runs["ours"].append(solve_ours(solver, problem)),
        "theirs": lambda: runs["theirs"].append(solve_theirs(pair, tol, max_iter, problem)),
    }
    with torch.no_grad():
        timings = time_interleaved(candidates, repeats=repeats, warmup=1)
    sides = {}
    for side in ("ours", "theirs"):
        ordered = runs[side][1:]  # one run per timed call, in the order of the timings (after the warm-up)
        sides[side] = Side(
            timings[side],
            ordered[-1],
            [run.f_cpu for run in ordered],
            relative_residual(problem, ordered[-1].value),
        )
    return Comparison(problem.name, tol, pair.name, sides["ours"], sides["theirs"])


# -- the parts of the report ------------------------------------------------------------------------------------
def equal_tolerance_table(comparisons: Sequence[Comparison]) -> str:
    headers = [
        "cell",
        "tol (rel)",
        "solver",
        "f evals: ik / td",
        "wall ms: ik / td",
        "ik/td wall",
        "ik/td CPU",
        "max residual: ik / td",
    ]
    rows = []
    for c in comparisons:
        rows.append(
            [
                c.problem,
                f"{c.tol:g}",
                c.pair,
                f"{c.ours.run.calls} / {c.theirs.run.calls}",
                f"{1e3 * c.ours.timing.wall_median:.1f} / {1e3 * c.theirs.timing.wall_median:.1f}",
                f"**{c.wall_ratio:.2f}**",
                f"{c.cpu_ratio:.2f}",
                f"{fmt(float(c.ours.residual.max()), 2)} / {fmt(float(c.theirs.residual.max()), 2)}",
            ]
        )
    return markdown_table(headers, rows)


def overhead_table(comparisons: Sequence[Comparison]) -> str:
    headers = ["cell", "tol (rel)", "solver", "CPU ms per solve: ik / td", "outside f: ik", "outside f: td"]
    rows = [
        [
            c.problem,
            f"{c.tol:g}",
            c.pair,
            f"{1e3 * c.ours.timing.cpu_median:.1f} / {1e3 * c.theirs.timing.cpu_median:.1f}",
            f"**{100 * c.ours.overhead:.0f}%**",
            f"{100 * c.theirs.overhead:.0f}%",
        ]
        for c in comparisons
    ]
    return markdown_table(headers, rows)


def step_breakdown(problem: Problem, tol: float, max_iter: int, repeats: int) -> str:
    """Where implicitkit's solve time goes, per step: f, the solver's proposal (``step``), and the shared loop.

    The proposal is timed by wrapping the solver instance's ``step``; the loop is the rest of the solve
    (residual norms, stop rule, best iterate, the per-step host read, final stats). Thread-CPU medians.
    """
    rows = []
    for pair in pairs(max_iter):
        solver = pair.ours(tol, max_iter)
        proposal = Stopwatch()
        step = solver.step

        def timed_step(*args: Any, step=step, proposal=proposal) -> Tensor:
            with proposal:
                return step(*args)

        object.__setattr__(solver, "step", timed_step)  # instrumentation only: solver settings are frozen
        samples = []
        with torch.no_grad():
            for _ in range(repeats + 1):
                proposal.reset()
                total = Stopwatch()
                with total:
                    run = solve_ours(solver, problem)
                samples.append((total.cpu, run.f_cpu, proposal.cpu, run.calls))
        samples = samples[1:]  # after a warm-up
        steps = samples[0][3]

        def per_step(i: int, samples=samples, steps=steps) -> float:
            return 1e6 * statistics.median(s[i] for s in samples) / steps

        total, f_time, prop = per_step(0), per_step(1), per_step(2)
        loop = total - f_time - prop
        rows.append(
            [
                pair.name,
                steps,
                f"{total:.0f}",
                f"{f_time:.0f}",
                f"{prop:.0f} ({100 * prop / total:.0f}%)",
                f"{loop:.0f} ({100 * loop / total:.0f}%)",
            ]
        )
    headers = ["solver", "steps", "µs per step", "in f", "proposal (step)", "loop and bookkeeping"]
    return markdown_table(headers, rows)


def goal_lines(comparisons: Sequence[Comparison], overhead_cell: str) -> str:
    """The issue's two goals, checked on the measured numbers."""
    lines = []
    for c in comparisons:
        if c.pair != "Anderson":
            continue
        ok = c.wall_ratio <= 0.8 and c.ours.run.calls <= c.theirs.run.calls
        lines.append(
            f"- Anderson on {c.problem}, tol {c.tol:g}: wall {c.wall_ratio:.2f}x torchdeq's "
            f"(CPU {c.cpu_ratio:.2f}x), {c.ours.run.calls} vs {c.theirs.run.calls} evaluations of f: "
            f"{'met' if ok else 'NOT met'} (goal <= 0.8x, no more evaluations)"
        )
    for c in comparisons:
        if c.problem == overhead_cell:
            ok = c.ours.overhead <= 0.10
            lines.append(
                f"- overhead of {c.pair} on {c.problem}, tol {c.tol:g}: {100 * c.ours.overhead:.0f}% of the "
                f"solve's CPU time outside f: {'met' if ok else 'NOT met'} (goal <= 10%)"
            )
    return "\n".join(lines)


@dataclass
class MixedResult:
    label: str
    runs: dict[str, Run]
    wall: dict[str, float]
    residual: dict[str, Tensor]
    invariance: dict[str, float]


def mixed_problem(width: int, batch: int, *, nan_sample: bool, seed: int) -> tuple[Problem, Tensor]:
    """The MLP cell with inputs scaled log-uniformly from 0.4 (slow) to 10 (fast); optionally one NaN input.

    In float64, so that a sample solved alone and inside the batch differ only by what the solver does
    (in float32 the matrix products themselves round differently for different batch sizes).
    """
    problem = make_problem("mlp", width, batch, seed=seed, dtype=torch.float64)
    scales = torch.logspace(torch.log10(torch.tensor(0.4)).item(), 1.0, batch, dtype=torch.float64)
    problem.x = problem.x * scales[:, None]
    if nan_sample:
        problem.x[batch // 2, 0] = float("nan")
    return problem, scales


def solve_mixed(problem: Problem, tol: float, max_iter: int, repeats: int) -> MixedResult:
    """Anderson from both libraries on a mixed batch, and each of a few samples solved alone."""
    pair = pairs(max_iter)[1]
    runs: dict[str, Run] = {}
    solver = pair.ours(tol, max_iter)
    candidates = {
        "ik": lambda: runs.__setitem__("ik", solve_ours(solver, problem)),
        "td": lambda: runs.__setitem__("td", solve_theirs(pair, tol, max_iter, problem)),
    }
    with torch.no_grad():
        timings = time_interleaved(candidates, repeats=repeats, warmup=1)
        invariance = {name: 0.0 for name in candidates}
        for i in (0, problem.batch - 1):  # the slowest and the fastest sample, alone
            alone = Problem(problem.name, problem.cell, problem.x[i : i + 1])
            got = {"ik": solve_ours(solver, alone), "td": solve_theirs(pair, tol, max_iter, alone)}
            for name, run in got.items():
                diff = float((run.value[0] - runs[name].value[i]).abs().max())
                invariance[name] = max(invariance[name], diff)
    residual = {name: relative_residual(problem, run.value) for name, run in runs.items()}
    wall = {name: t.wall_median for name, t in timings.items()}
    return MixedResult(problem.name, runs, wall, residual, invariance)


def mixed_table(results: Sequence[tuple[str, MixedResult]], tol: float) -> str:
    headers = [
        "batch",
        "solver",
        "f evals",
        "steps per sample (min / median / max)",
        "wall ms",
        "samples with r <= tol",
        "max r (finite samples)",
        "alone vs in batch: max abs diff",
    ]
    rows = []
    for label, res in results:
        for name, title in (("ik", "implicitkit Anderson"), ("td", "torchdeq anderson")):
            run, r = res.runs[name], res.residual[name]
            finite = torch.isfinite(r)
            steps = "all samples: " + str(run.calls)
            if run.nstep is not None:
                n = run.nstep.float()
                steps = f"{int(n.min())} / {int(n.median())} / {int(n.max())}"
            rows.append(
                [
                    label,
                    title,
                    run.calls,
                    steps,
                    f"{1e3 * res.wall[name]:.1f}",
                    f"{int((r <= tol).sum())}/{r.numel()}",
                    fmt(float(r[finite].max()), 2),
                    fmt(res.invariance[name], 2),
                ]
            )
    return markdown_table(headers, rows)


def trace_figure(problem: Problem, tol: float, max_iter: int, path: Path) -> Path:
    """Residual (common definition, max over the batch) after each evaluation of f, for all six solvers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = {"FixedPointIteration": "tab:gray", "Anderson": "tab:blue", "Broyden": "tab:green"}
    for pair in pairs(max_iter):
        for side, style in (("implicitkit", "-"), ("torchdeq", "--")):
            trace: list[float] = []

            def recording(z: Tensor, trace: list[float] = trace) -> Tensor:
                fz = problem.f(z)
                r = torch.linalg.vector_norm((fz - z).flatten(1), dim=1)
                trace.append(float((r / torch.linalg.vector_norm(fz.flatten(1), dim=1)).max()))
                return fz

            fmap = CountedMap(recording)
            with torch.no_grad():
                if side == "implicitkit":
                    solve_ours(pair.ours(tol, max_iter), problem, fmap)
                else:
                    solve_theirs(pair, tol, max_iter, problem, fmap)
            label = f"{side} {pair.name if side == 'implicitkit' else pair.theirs}"
            ax.semilogy(range(1, len(trace) + 1), trace, style, color=colors[pair.name], label=label)
    ax.axhline(tol, color="k", lw=0.8, ls=":")
    ax.set_xlabel("evaluations of f on the batch")
    ax.set_ylabel("max over batch of ||f(z)-z|| / ||f(z)||")
    ax.set_title(f"{problem.name}, batch {problem.batch}, tol {tol:g} (rel)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def ratio_figure(comparisons: Sequence[Comparison], path: Path) -> Path:
    """implicitkit's wall time as a fraction of torchdeq's, per cell, tolerance and solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["FixedPointIteration", "Anderson", "Broyden"]
    groups = list(dict.fromkeys((c.problem, c.tol) for c in comparisons))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.75 * len(groups) + 1.5), 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        values = []
        for group in groups:
            match = [c for c in comparisons if (c.problem, c.tol) == group and c.pair == name]
            values.append(match[0].wall_ratio if match else float("nan"))
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.8, color="tab:red", lw=0.8, ls="--", label="goal for Anderson (0.8)")
    ax.set_xticks([i + width for i in range(len(groups))])
    ax.set_xticklabels([f"{p.replace(' ', chr(10), 1)}\n{t:g}" for p, t in groups], fontsize=7)
    ax.set_ylabel("implicitkit / torchdeq wall time")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    return save_figure(fig, path)


# -- the script ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed repeats per candidate")
    parser.add_argument("--max-iter", type=int, default=100)
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    out: Path = args.out
    if args.quick:
        problems = [make_problem("mlp", 32, 8, seed=args.seed)]
        tols, repeats, mixed_batch, mixed_width = [1e-3], 2, 8, 32
        overhead_cell = problems[0].name
    else:
        problems = [make_problem("mlp", w, 64, seed=args.seed) for w in (64, 256, 1024)]
        problems += [make_problem("conv", c, 32, seed=args.seed) for c in (16, 32)]
        tols, repeats, mixed_batch, mixed_width = [1e-3, 1e-4, 1e-5], args.repeats, 64, 256
        overhead_cell = "MLP w=256"

    start = time.perf_counter()
    report = Report(
        out,
        "solvers",
        f"## Solvers: implicitkit against torchdeq 0.1.0\n\nCommand: `{command_line()}`\n\nMachine: {machine()}\n",
    )
    comparisons = []
    for problem in problems:
        for tol in tols:
            for pair in pairs(args.max_iter):
                comparisons.append(compare(pair, problem, tol, args.max_iter, repeats))
                c = comparisons[-1]
                print(
                    f"  {c.problem} tol {tol:g} {c.pair}: evals {c.ours.run.calls}/{c.theirs.run.calls} "
                    f"wall ratio {c.wall_ratio:.2f} overhead {100 * c.ours.overhead:.0f}%",
                    flush=True,
                )
    batches = {problem.name: problem.batch for problem in problems}
    report.add(
        f"Equal tolerance (max_iter {args.max_iter}, batch {sorted(set(batches.values()))}, medians of {repeats})",
        equal_tolerance_table(comparisons),
    )
    overhead_cells = {overhead_cell, "MLP w=1024"}
    report.add(
        "Solver overhead: CPU time outside the calls of f",
        overhead_table([c for c in comparisons if c.problem in overhead_cells]),
    )
    breakdown_problem = next(p for p in problems if p.name == overhead_cell)
    report.add(
        f"Where implicitkit's time goes per step ({overhead_cell}, batch {breakdown_problem.batch}, tol {tols[0]:g})",
        step_breakdown(breakdown_problem, tols[0], args.max_iter, repeats),
    )
    report.add("Goals", goal_lines(comparisons, overhead_cell))

    mixed_tol = tols[-1] if args.quick else 1e-4
    mixed = []
    for nan_sample in (False, True):
        problem, _ = mixed_problem(mixed_width, mixed_batch, nan_sample=nan_sample, seed=args.seed)
        label = f"{problem.name}, inputs x0.4..x10" + (", one NaN sample" if nan_sample else "")
        mixed.append((label, solve_mixed(problem, mixed_tol, args.max_iter, repeats)))
    report.add(f"Mixed difficulty (Anderson, tol {mixed_tol:g} rel, float64)", mixed_table(mixed, mixed_tol))

    trace_png = trace_figure(
        problems[1 if len(problems) > 1 else 0], tols[-1], args.max_iter, out / "solvers_trace.png"
    )
    ratio_png = ratio_figure(comparisons, out / "solvers_ratio.png")
    report.add("Figures", f"![residual traces]({trace_png.name})\n\n![time ratios]({ratio_png.name})")
    report.add("Run time", f"{time.perf_counter() - start:.0f} s")
    path = report.write()
    print(f"wrote {path}")
    return {"comparisons": comparisons, "mixed": mixed, "report": path}


if __name__ == "__main__":
    main()
