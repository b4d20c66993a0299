"""Gradient estimators compared: what each costs, how close it is to the exact gradient, what it buys.

Three parts, each a table in the report and a figure:

1. Cost. Backward time (median over interleaved repeats) and the activation memory the graph holds (peak
   bytes saved for backward, parameters excluded) for every estimator, on the DEQ MLP cell and the DEQ conv
   cell at a few widths, and as the forward solve runs 10 to 100 steps.
2. Quality. In float64, each estimator's parameter gradient at a forward solve of training accuracy
   (Anderson, rel. tol 1e-4) against the exact gradient (IFT at a tightly converged fixed point): cosine
   similarity, relative error, and a measured descent check (the loss after a small step along the
   estimate, against the same step along the exact gradient).
3. Training. The DEQ classifier of scikit-learn's 8x8 digits trained with each estimator for the same number
   of epochs, over several seeds: test accuracy (mean ± std) and time.
4. Reversible's drift. Its gradient against the autograd gradient of the same coupled iteration, in float64
   and float32, as the number of steps undone grows, with and without checkpoints.

Usage::

    .venv/bin/python benchmarks/gradient_estimators.py            # about 7 minutes on 2 cores
    .venv/bin/python benchmarks/gradient_estimators.py --quick    # seconds, for the smoke test
    .venv/bin/python benchmarks/gradient_estimators.py --only IFT "Unrolled (FPI)" "Reversible beta=0.8"
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    MLPCell,
    Problem,
    Report,
    SavedActivations,
    Stopwatch,
    base_parser,
    command_line,
    fmt,
    machine,
    make_problem,
    markdown_table,
    mean_std,
    save_figure,
    setup,
    time_interleaved,
)
from torch import Tensor, nn

import implicitkit as ik

MiB = 2.0**20


@dataclass(frozen=True)
class Candidate:
    """A gradient estimator and the forward solver it is used with (Anderson unless ``picard``)."""

    estimator: ik.GradientEstimator
    picard: bool = False

    def solver(self, tol: float, max_iter: int) -> ik.Solver:
        """The forward solver at the given tolerance (rel) and step budget."""
        if self.picard:
            return ik.FixedPointIteration(tol=tol, max_iter=max_iter)
        return ik.Anderson(tol=tol, max_iter=max_iter)


def color(name: str) -> str:
    """One colour per candidate, the same in every figure."""
    names = list(estimators(1e-4))
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:gray",
    ]
    palette += ["tab:olive", "tab:cyan", "gold"]
    return palette[names.index(name) % len(palette)] if name in names else "black"


def estimators(adjoint_tol: float, adjoint_max_iter: int = 50) -> dict[str, Candidate]:
    """The candidates compared, by display name; IFT's adjoint is solved to ``adjoint_tol`` (rel).

    Unrolled appears twice: through Anderson (the forward solver of every other row) and through plain
    fixed-point iteration, because backpropagating through Anderson's mixing weights behaves differently.
    Reversible runs its own coupled iteration under a plain fixed-point iteration's budget (one of its steps
    applies f twice).
    """
    return {
        "IFT": Candidate(ik.IFT(ik.Anderson(tol=adjoint_tol, max_iter=adjoint_max_iter), on_failure="warn")),
        "JFB": Candidate(ik.JFB()),
        "Phantom k=5 tau=0.5": Candidate(ik.Phantom(k=5, tau=0.5)),
        "Phantom k=10 tau=0.5": Candidate(ik.Phantom(k=10, tau=0.5)),
        "Phantom k=5 tau=0.8": Candidate(ik.Phantom(k=5, tau=0.8)),
        "RAG k=2": Candidate(ik.RAG(k=2)),
        "Neumann k=5": Candidate(ik.Neumann(k=5)),
        "Unrolled (Anderson)": Candidate(ik.Unrolled()),
        "Unrolled (FPI)": Candidate(ik.Unrolled(), picard=True),
        "Reversible beta=0.8": Candidate(ik.Reversible(0.8), picard=True),
        "Reversible beta=0.8 every 5": Candidate(ik.Reversible(0.8, checkpoint_every=5), picard=True),
    }


class Readout:
    """A fixed random linear map of the state to 10 outputs and a squared error to a random target."""

    def __init__(self, problem: Problem, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        dim = problem.x[0].numel()
        dtype = problem.x.dtype
        self.weight = (torch.randn(dim, 10, generator=gen) / dim**0.5).to(dtype)
        self.target = torch.randn(problem.batch, 10, generator=gen).to(dtype)

    def __call__(self, z: Tensor) -> Tensor:
        return (z.flatten(1) @ self.weight - self.target).square().mean()


def parameter_gradient(
    problem: Problem, estimator: ik.GradientEstimator, solver: ik.Solver, loss: Readout
) -> tuple[Tensor, ik.Solution]:
    """The flat gradient of the readout loss at the fixed point with respect to the cell's parameters."""
    params = list(problem.cell.parameters())
    sol = ik.fixed_point(problem.f, problem.z0(), solver=solver, gradient=estimator)
    grads = torch.autograd.grad(loss(sol.value), params)
    return torch.cat([g.reshape(-1) for g in grads]), sol


# -- part 1: cost -------------------------------------------------------------------------------------------
@dataclass
class Cost:
    """Backward cost of one estimator on one problem at one forward step count."""

    problem: str
    estimator: str
    steps: int
    forward_ms: float
    backward_ms: float
    peak_bytes: int
    adjoint_steps: float | None = None


def measure_costs(problem: Problem, steps: int, cands: dict[str, Candidate], repeats: int) -> list[Cost]:
    """Forward and backward CPU time and graph memory of each candidate after exactly ``steps`` solver steps.

    The forward solver runs with ``tol=0``, so every sample takes ``steps`` steps. The first (untimed) run of
    each candidate measures the memory; the timed runs follow, interleaved.
    """
    loss = Readout(problem)
    params = list(problem.cell.parameters())
    records: dict[str, list[tuple[float, float]]] = {name: [] for name in cands}
    adjoint: dict[str, float] = {}

    def candidate(name: str) -> Callable[[], None]:
        solver = cands[name].solver(0.0, steps)

        def run() -> None:
            forward, backward = Stopwatch(), Stopwatch()
            with forward:
                sol = ik.fixed_point(problem.f, problem.z0(), solver=solver, gradient=cands[name].estimator)
                value = loss(sol.value)
            with backward:
                torch.autograd.grad(value, params)
            records[name].append((forward.cpu, backward.cpu))
            if sol.backward_stats and isinstance(sol.backward_stats[-1], ik.AdjointStats):
                adjoint[name] = float(sol.backward_stats[-1].nstep.float().mean())

        return run

    peak = {}
    for name in cands:
        with SavedActivations(exclude=params) as mem:
            candidate(name)()
        peak[name] = mem.peak_bytes
    time_interleaved({name: candidate(name) for name in cands}, repeats=repeats, warmup=0)
    costs = []
    for name in cands:
        timed = records[name][1:]  # after the memory run
        costs.append(
            Cost(
                problem.name,
                name,
                steps,
                1e3 * statistics.median(f for f, _ in timed),
                1e3 * statistics.median(b for _, b in timed),
                peak[name],
                adjoint.get(name),
            )
        )
    return costs


def width_table(costs: Sequence[Cost]) -> str:
    """Rows: estimators; columns: problems; cells: backward ms / activation MiB."""
    problems = list(dict.fromkeys(c.problem for c in costs))
    names = list(dict.fromkeys(c.estimator for c in costs))
    by_key = {(c.problem, c.estimator): c for c in costs}
    rows = []
    for name in names:
        row = [name]
        for p in problems:
            c = by_key[(p, name)]
            row.append(f"{c.backward_ms:.1f} ms / {c.peak_bytes / MiB:.2f} MiB")
        rows.append(row)
    return markdown_table(["estimator", *problems], rows)


def steps_table(costs: Sequence[Cost], problem: str) -> str:
    """Rows: estimators; columns: forward steps; cells: backward ms / activation MiB."""
    sel = [c for c in costs if c.problem == problem]
    steps = sorted({c.steps for c in sel})
    names = list(dict.fromkeys(c.estimator for c in sel))
    by_key = {(c.estimator, c.steps): c for c in sel}
    rows = [[name] + [_cell(by_key[(name, n)]) for n in steps] for name in names]
    return markdown_table(["estimator", *[f"{n} steps" for n in steps]], rows)


def _cell(c: Cost) -> str:
    return f"{c.backward_ms:.1f} ms / {c.peak_bytes / MiB:.2f} MiB"


def cost_figure(costs: Sequence[Cost], problems: Sequence[str], path: Path) -> Path:
    """Backward time and activation memory against forward steps, one column per problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(problems), figsize=(4.6 * len(problems), 6.0), squeeze=False)
    for j, problem in enumerate(problems):
        sel = [c for c in costs if c.problem == problem]
        for name in dict.fromkeys(c.estimator for c in sel):
            pts = sorted((c.steps, c.backward_ms, c.peak_bytes / MiB) for c in sel if c.estimator == name)
            style = dict(ls="--" if name.startswith("Phantom") else "-", marker="o", ms=3, color=color(name))
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
            axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], label=name, **style)
        axes[0][j].set_title(problem, fontsize=9)
        axes[0][j].set_ylabel("backward CPU ms")
        axes[1][j].set_ylabel("activation memory (MiB)")
        axes[1][j].set_xlabel("forward solver steps")
        for ax in axes[:, j]:
            ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


# -- part 2: quality ------------------------------------------------------------------------------------------
@dataclass
class Quality:
    problem: str
    estimator: str
    cosine: float
    relative_error: float
    decrease_ratio: float
    descent: bool


def loss_at(problem: Problem, loss: Readout, solver: ik.Solver, direction: Tensor, step: float) -> float:
    """The readout loss at the fixed point after moving the parameters by ``-step * direction``."""
    params = list(problem.cell.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        offset = 0
        for p in params:
            p -= step * direction[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        z, _ = ik.fixed_point(problem.f, problem.z0(), solver=solver)
        value = float(loss(z))
        for p, s in zip(params, saved):
            p.copy_(s)
    return value


def measure_quality(
    problem: Problem,
    cands: dict[str, Candidate],
    forward_tol: float,
    exact_tol: float = 1e-11,
    max_iter: int = 500,
) -> list[Quality]:
    """Compare every estimator at a training-accuracy forward solve with the exact gradient (float64).

    The exact gradient is IFT's with the forward solved to ``exact_tol`` and the adjoint to a tenth of it.
    """
    loss = Readout(problem)
    exact_solver = ik.Anderson(tol=exact_tol, max_iter=max_iter)
    reference = ik.IFT(ik.Anderson(tol=exact_tol / 10, max_iter=max_iter), on_failure="warn")
    g_ref, ref = parameter_gradient(problem, reference, exact_solver, loss)
    if not (ref.stats.converged.all() and all(b.converged.all() for b in ref.backward_stats)):
        raise RuntimeError(
            f"The reference gradient of {problem.name} is not converged (forward {ref.stats.summary()}; "
            f"adjoint {[b.summary() for b in ref.backward_stats]}), so no estimator can be compared with it: "
            "raise its max_iter or choose a problem whose samples all converge."
        )
    theta = torch.cat([p.detach().reshape(-1) for p in problem.cell.parameters()])
    step = 1e-3 * float(theta.norm())
    base = loss_at(problem, loss, exact_solver, torch.zeros_like(theta), 0.0)
    ref_decrease = base - loss_at(problem, loss, exact_solver, g_ref / g_ref.norm(), step)
    rows = []
    for name, cand in cands.items():
        solver = cand.solver(forward_tol, min(200, max_iter))
        g, _ = parameter_gradient(problem, cand.estimator, solver, loss)
        decrease = base - loss_at(problem, loss, exact_solver, g / g.norm(), step)
        rows.append(
            Quality(
                problem.name,
                name,
                float(torch.dot(g, g_ref) / (g.norm() * g_ref.norm())),
                float((g - g_ref).norm() / g_ref.norm()),
                decrease / ref_decrease,
                decrease > 0,
            )
        )
    return rows


def quality_table(rows: Sequence[Quality], radius: dict[str, float]) -> str:
    """Rows: estimators; columns: problems; cells: cosine / relative error / loss decrease vs exact."""
    problems = list(dict.fromkeys(r.problem for r in rows))
    names = list(dict.fromkeys(r.estimator for r in rows))
    by_key = {(r.problem, r.estimator): r for r in rows}
    headers = ["estimator", *[f"{p}, rho(J) = {radius[p]:.2f}" for p in problems]]
    body = []
    for name in names:
        row = [name]
        for p in problems:
            r = by_key[(p, name)]
            ascent = "" if r.descent else " (ascent)"
            row.append(f"{r.cosine:.3f} / {fmt(r.relative_error, 2)} / {r.decrease_ratio:.2f}{ascent}")
        body.append(row)
    return markdown_table(headers, body)


# -- part 3: training on digits ---------------------------------------------------------------------------------
class DigitsDEQ(nn.Module):
    """``x -> Linear(64, w) -> DEQ(MLPCell(w)) -> Linear(w, 10)`` for 8x8 digit images."""

    def __init__(self, width: int, estimator: ik.GradientEstimator, solver: ik.Solver) -> None:
        super().__init__()
        self.inject = nn.Linear(64, width)
        self.deq = ik.DEQ(MLPCell(width), solver=solver, gradient=estimator)
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> tuple[Tensor, ik.SolverStats]:
        u = self.inject(x)
        z, stats = self.deq(torch.zeros_like(u), u)
        return self.head(z), stats


@dataclass
class Digits:
    """The 1797 digits, split 80/20 stratified by class with a fixed seed; pixels standardised on the train split."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @classmethod
    def load(cls, limit: int | None = None) -> Digits:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(
            data.data, data.target, test_size=0.2, stratify=data.target, random_state=0
        )
        if limit is not None:
            x_tr, y_tr, x_te, y_te = x_tr[:limit], y_tr[:limit], x_te[:limit], y_te[:limit]
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0).clip(min=1.0)  # pixels are 0..16; some always 0

        def tensor(a, dtype):
            return torch.as_tensor(a, dtype=dtype)

        return cls(
            tensor((x_tr - mean) / std, torch.float32),
            tensor(y_tr, torch.long),
            tensor((x_te - mean) / std, torch.float32),
            tensor(y_te, torch.long),
        )


@dataclass
class TrainRun:
    estimator: str
    seed: int
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch
    train_loss: float = float("nan")
    seconds: float = 0.0
    forward_steps: float = 0.0
    forward_converged: float = 0.0  # share of training samples whose forward solve reached tol, last epoch


def train_digits(data: Digits, name: str, seed: int, args: Any) -> TrainRun:
    """Train the digits DEQ with one candidate for ``args.epochs`` epochs; test accuracy after each."""
    torch.manual_seed(seed)
    cand = estimators(adjoint_tol=args.train_tol)[name]
    model = DigitsDEQ(args.train_width, cand.estimator, cand.solver(args.train_tol, args.train_max_iter))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    run = TrainRun(name, seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(data.x_train), generator=gen)
        losses, steps, converged = [], [], []
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            logits, stats = model(data.x_train[idx])
            loss = nn.functional.cross_entropy(logits, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps.append(float(stats.nstep.float().mean()))
            converged.append(float(stats.converged.float().mean()))
        run.train_loss, run.forward_steps = statistics.fmean(losses), statistics.fmean(steps)
        run.forward_converged = statistics.fmean(converged)
        run.test_accuracy.append(evaluate(model, data))
    run.seconds = time.perf_counter() - start
    return run


@torch.no_grad()
def evaluate(model: DigitsDEQ, data: Digits) -> float:
    model.eval()
    logits, _ = model(data.x_test)
    return float((logits.argmax(dim=1) == data.y_test).float().mean())


def training_table(runs: Sequence[TrainRun]) -> str:
    names = list(dict.fromkeys(r.estimator for r in runs))
    rows = []
    for name in names:
        sel = [r for r in runs if r.estimator == name]
        rows.append(
            [
                name,
                mean_std([r.test_accuracy[-1] for r in sel]),
                f"{statistics.fmean(r.train_loss for r in sel):.3f}",
                f"{statistics.fmean(r.forward_steps for r in sel):.1f}",
                f"{100 * statistics.fmean(r.forward_converged for r in sel):.0f}%",
                f"{statistics.fmean(r.seconds for r in sel):.1f}",
            ]
        )
    headers = [
        "estimator",
        "test accuracy % (mean ± std)",
        "last-epoch train loss",
        "forward steps",
        "forward converged",
        "wall s per run",
    ]
    return markdown_table(headers, rows)


def training_figure(runs: Sequence[TrainRun], path: Path) -> Path:
    """Test accuracy after each epoch, mean over seeds, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name in dict.fromkeys(r.estimator for r in runs):
        curves = torch.tensor([r.test_accuracy for r in runs if r.estimator == name])
        mean, std = (
            100 * curves.mean(0),
            100 * (curves.std(0) if len(curves) > 1 else torch.zeros(curves.shape[1])),
        )
        epochs = range(1, len(mean) + 1)
        ax.plot(epochs, mean, marker="o", ms=3, label=name, color=color(name))
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.15, color=color(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("digits DEQ classifier, mean ± std over seeds", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


# -- part 4: Reversible's drift -----------------------------------------------------------------------------
def coupled_iterates(problem: Problem, beta: float, steps: int) -> list[Tensor]:
    """``z_0 .. z_steps`` of Reversible's coupled iteration, unrolled with autograd: the exact reference."""
    y = z = problem.z0()
    zs = [z]
    for _ in range(steps):
        y = (1 - beta) * y + beta * problem.f(z)
        z = (1 - beta) * z + beta * problem.f(y)
        zs.append(z)
    return zs


def drift_row(problem: Problem, beta: float, every: int | None, steps: int) -> tuple[float, float]:
    """Relative error of Reversible's parameter gradient against the unrolled coupled iteration, and the drift
    of its rebuilt path (``ReversibleStats.reconstruction_error``, max over the batch), after ``steps``."""
    loss, params = Readout(problem), list(problem.cell.parameters())
    gradient = ik.Reversible(beta, checkpoint_every=every)
    solver = ik.FixedPointIteration(tol=None, max_iter=steps)
    sol = ik.fixed_point(problem.f, problem.z0(), solver=solver, gradient=gradient)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(sol.value), params)])
    back = sol.backward_stats[-1]
    zs = coupled_iterates(problem, beta, int(back.nstep.max()))
    rows = torch.arange(problem.batch)
    z_ref = torch.stack(zs)[back.nstep, rows]  # each sample at its own (best) step
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(z_ref), params)])
    return float((got - want).norm() / want.norm()), float(back.reconstruction_error.max())


def drift_part(report: Report, sizes: Plan) -> None:
    """Part 4: Reversible against the exact gradient of its own iteration, steps x dtype x beta x checkpoints."""
    header, rows = None, []
    for dtype in (torch.float64, torch.float32):
        problem = make_problem("mlp", sizes.drift_width, 16, dtype=dtype)
        for beta, every in sizes.drift_settings:
            cells = [
                fmt(e, 2) + " / " + fmt(d, 2)
                for e, d in (drift_row(problem, beta, every, n) for n in sizes.drift_steps)
            ]
            label = f"{str(dtype).removeprefix('torch.')}, beta={beta:g}" + (
                f", every {every}" if every else ""
            )
            rows.append([label, *cells])
    header = ["Reversible", *[f"{n} steps" for n in sizes.drift_steps]]
    report.add(
        f"Reversible's gradient against the autograd gradient of the same iteration: relative error / drift of "
        f"the rebuilt path (MLP w={sizes.drift_width}, batch 16, a fixed number of steps)",
        markdown_table(header, rows),
    )


# -- the script ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per estimator")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-width", type=int, default=64)
    parser.add_argument("--train-tol", type=float, default=1e-3)
    parser.add_argument("--train-max-iter", type=int, default=30)
    parser.add_argument("--only", nargs="+", help="measure only these candidates (display names)")
    args = parser.parse_args(argv)
    setup(args.threads, args.seed)
    with warnings.catch_warnings():
        # IFT's adjoint solve warns when it stops at max_iter, and Reversible when its rebuilt path overflows
        # on long solves; the tables report the adjoint's steps and the gradients' errors instead.
        warnings.filterwarnings("ignore", message="IFT adjoint", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Reversible", category=RuntimeWarning)
        return run(args)


@dataclass
class Plan:
    """The sizes of one run of the script (``--quick`` or the default)."""

    width_problems: list[Problem]
    sweep_problems: list[Problem]
    sweep_steps: list[int]
    fixed_steps: int
    quality_problems: list[Problem]
    exact_tol: float
    exact_max_iter: int
    train_names: list[str]
    digits_limit: int | None
    drift_width: int
    drift_steps: list[int]
    drift_settings: list[tuple[float, int | None]]
    only: list[str] | None = None

    def chosen(self, cands: dict[str, Candidate]) -> dict[str, Candidate]:
        """The candidates ``--only`` names (all without it)."""
        return {k: v for k, v in cands.items() if self.only is None or k in self.only}


def plan(args: Any) -> Plan:
    if args.quick:
        args.epochs, args.seeds, args.train_width, args.repeats = 1, 1, 16, 1
        mlp = make_problem("mlp", 32, 4)
        return Plan(
            width_problems=[mlp, make_problem("conv", 8, 2, spatial=4)],
            sweep_problems=[mlp],
            sweep_steps=[3, 6],
            fixed_steps=3,
            quality_problems=[make_problem("mlp", 32, 4, seed=1, dtype=torch.float64)],  # all 4 converge
            exact_tol=1e-9,
            exact_max_iter=100,
            train_names=[n for n in ("IFT", "Unrolled (Anderson)") if args.only is None or n in args.only],
            digits_limit=128,
            drift_width=16,
            drift_steps=[2, 4],
            drift_settings=[(0.8, None), (0.8, 2)],
            only=args.only,
        )
    mlp, conv = (
        [make_problem("mlp", w, 64) for w in (64, 256, 1024)],
        [make_problem("conv", c, 32) for c in (16, 32)],
    )
    return Plan(
        width_problems=mlp + conv,
        sweep_problems=[mlp[1], conv[0]],
        sweep_steps=[10, 25, 50, 100],
        fixed_steps=25,
        quality_problems=[
            make_problem("mlp", 256, 64, dtype=torch.float64),
            make_problem("conv", 16, 32, dtype=torch.float64),
            make_problem("mlp", 64, 64, dtype=torch.float64),
        ],
        exact_tol=1e-11,
        exact_max_iter=500,
        train_names=[
            n
            for n in estimators(1e-3)
            if not n.startswith("Phantom k=10")
            and n != "Phantom k=5 tau=0.8"
            and (args.only is None or n in args.only)
        ],
        digits_limit=None,
        drift_width=64,
        drift_steps=[5, 10, 20, 40, 80],
        drift_settings=[(0.5, None), (0.5, 3), (0.8, None), (0.8, 2), (0.8, 5)],
        only=args.only,
    )


def cost_part(report: Report, sizes: Plan, repeats: int, out: Path) -> tuple[list[Cost], list[Cost], Path]:
    """Part 1: the step sweep on two cells, then every width at ``fixed_steps`` (reusing the sweep)."""
    cands = sizes.chosen(estimators(adjoint_tol=1e-4))
    sweep: list[Cost] = []
    for problem in sizes.sweep_problems:
        for steps in sizes.sweep_steps:
            sweep += measure_costs(problem, steps, cands, repeats)
        print(f"  step sweep measured: {problem.name}", flush=True)
    widths: list[Cost] = []
    for problem in sizes.width_problems:
        reused = [c for c in sweep if c.problem == problem.name and c.steps == sizes.fixed_steps]
        widths += reused or measure_costs(problem, sizes.fixed_steps, cands, repeats)
        print(f"  cost measured: {problem.name}", flush=True)
    report.add(
        f"Backward CPU time and activation memory after {sizes.fixed_steps} forward steps "
        f"(batch {sizes.width_problems[0].batch} MLP, {sizes.width_problems[-1].batch} conv)",
        width_table(widths),
    )
    for problem in sizes.sweep_problems:
        report.add(f"Growth with forward steps: {problem.name}", steps_table(sweep, problem.name))
    adjoint = [c.adjoint_steps for c in sweep + widths if c.adjoint_steps is not None]
    if adjoint:
        report.add(
            "IFT's adjoint solve",
            f"Anderson, rel. tol 1e-4, at most 50 steps: {min(adjoint):.0f} to {max(adjoint):.0f} steps (mean "
            "over the batch) across the rows above.",
        )
    png = cost_figure(sweep, [p.name for p in sizes.sweep_problems], out / "gradient_estimators_cost.png")
    return widths, sweep, png


def quality_part(report: Report, sizes: Plan) -> list[Quality]:
    """Part 2: every candidate against the exact gradient, with each cell's spectral radius."""
    quality, radius = [], {}
    exact = ik.Anderson(tol=sizes.exact_tol, max_iter=sizes.exact_max_iter)
    for problem in sizes.quality_problems:
        with torch.no_grad():
            z, _ = ik.fixed_point(problem.f, problem.z0(), solver=exact)
        radius[problem.name] = float(ik.spectral_radius(problem.f, z, n_iter=100).median())
        quality += measure_quality(
            problem,
            sizes.chosen(estimators(1e-4)),
            1e-4,
            exact_tol=sizes.exact_tol,
            max_iter=sizes.exact_max_iter,
        )
        print(f"  quality measured: {problem.name}", flush=True)
    report.add(
        f"Gradient quality: cosine / relative error / loss decrease vs exact (float64; forward solve to rel. tol "
        f"1e-4; reference: IFT with the forward solved to {sizes.exact_tol:g} and the adjoint to "
        f"{sizes.exact_tol / 10:g})",
        quality_table(quality, radius),
    )
    return quality


def training_part(report: Report, sizes: Plan, args: Any, out: Path) -> tuple[list[TrainRun], Path]:
    """Part 3: the digits classifier, each candidate for the same epochs, every seed."""
    data = Digits.load(limit=sizes.digits_limit)
    runs = []
    for seed in range(args.seeds):
        for name in sizes.train_names:
            runs.append(train_digits(data, name, seed, args))
            print(f"  trained {name} seed {seed}: {100 * runs[-1].test_accuracy[-1]:.1f}%", flush=True)
    report.add(
        f"Digits classifier: {args.epochs} epochs, {args.seeds} seeds, width {args.train_width}, Adam lr "
        f"{args.lr:g}, batch {args.batch_size}, forward rel. tol {args.train_tol:g} (at most "
        f"{args.train_max_iter} steps), IFT adjoint to the same tolerance",
        training_table(runs),
    )
    return runs, training_figure(runs, out / "gradient_estimators_training.png")


def run(args: Any) -> dict[str, Any]:
    """The three parts, with the parsed arguments; see the module docstring."""
    out: Path = args.out
    sizes = plan(args)
    header = f"## Gradient estimators\n\nCommand: `{command_line()}`\n\nMachine: {machine()}\n"
    report = Report(out, "gradient_estimators", header)
    start = time.perf_counter()
    widths, sweep, cost_png = cost_part(report, sizes, args.repeats, out)
    quality = quality_part(report, sizes)
    runs, train_png = training_part(report, sizes, args, out)
    drift_part(report, sizes)
    report.add("Figures", f"![cost]({cost_png.name})\n\n![training]({train_png.name})")
    report.add("Run time", f"{time.perf_counter() - start:.0f} s")
    path = report.write()
    print(f"wrote {path}")
    return {"width_costs": widths, "sweep_costs": sweep, "quality": quality, "runs": runs}


if __name__ == "__main__":
    main()
