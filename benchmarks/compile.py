"""``torch.compile`` of a DEQ training step: implicitkit against torchdeq 0.1.0, on the same model and settings.

The model is an injection layer, a DEQ layer on the MLP cell of ``_common`` and a linear head; one training
step is its forward pass, a squared loss and the backward pass. For (Anderson + IFT), the defaults, and
(FixedPointIteration + JFB), each library's step is compiled with ``torch.compile`` (inductor on the CPU,
compile caches off) after ``torch._dynamo.reset()``, and the script prints per row:

- compile time: the first call of the compiled step (tracing, compiling and one run), wall seconds;
- graph breaks: Dynamo's count during that first call (``torch._dynamo.utils.counters``);
- the steady-state step time of the compiled and of the eager step (medians over interleaved repeats);
- the largest difference of the compiled step's loss and parameter gradients from the eager step's, each
  relative to the largest entry of the eager tensor.

Usage::

    .venv/bin/python benchmarks/compile.py             # about 1 minute on 2 cores
    .venv/bin/python benchmarks/compile.py --quick     # smallest sizes, for the smoke test
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo
import torch._inductor.config
from _common import (
    MLPCell,
    Report,
    base_parser,
    command_line,
    fmt,
    machine,
    markdown_table,
    setup,
    time_interleaved,
)
from torch import Tensor, nn
from torch._dynamo.utils import counters

import implicitkit as ik

# Every compile starts from nothing: cached graphs would make whichever library runs second look faster.
torch._inductor.config.force_disable_caches = True

# Some samples of this cell stop at max_iter: the same for both libraries, and beside the point here.
FORWARD = dict(tol=1e-4, max_iter=30, stop_mode="rel", on_failure="report")
ADJOINT = dict(tol=1e-6, max_iter=50, stop_mode="rel")


class ImplicitkitModel(nn.Module):
    """Injection, an ``ik.DEQ`` layer on the MLP cell, a linear head."""

    def __init__(self, width: int, solver: ik.Solver, gradient: ik.GradientEstimator) -> None:
        super().__init__()
        self.inject, self.cell, self.head = nn.Linear(width, width), MLPCell(width), nn.Linear(width, 1)
        self.deq = ik.DEQ(self.cell, solver=solver, gradient=gradient)

    def forward(self, x: Tensor) -> Tensor:
        u = self.inject(x)
        z, _ = self.deq(torch.zeros_like(u), u)
        return self.head(z).square().mean()


class TorchdeqModel(nn.Module):
    """The same model with torchdeq's ``get_deq`` layer."""

    def __init__(self, width: int, **deq_args) -> None:
        from torchdeq import get_deq

        super().__init__()
        self.inject, self.cell, self.head = nn.Linear(width, width), MLPCell(width), nn.Linear(width, 1)
        self.deq = get_deq(**deq_args)

    def forward(self, x: Tensor) -> Tensor:
        u = self.inject(x)
        zs, _ = self.deq(lambda z: self.cell(z, u), torch.zeros_like(u))
        return self.head(zs[-1]).square().mean()


@dataclass(frozen=True)
class Setting:
    name: str
    implicitkit: Callable[[int], nn.Module]
    torchdeq: Callable[[int], nn.Module]


def _torchdeq_args(solver: str) -> dict:
    return dict(
        f_solver=solver, f_max_iter=FORWARD["max_iter"], f_tol=FORWARD["tol"], f_stop_mode="rel",
        b_solver="anderson", b_max_iter=ADJOINT["max_iter"], b_tol=ADJOINT["tol"], b_stop_mode="rel",
    )  # fmt: skip


SETTINGS = [
    Setting(
        "Anderson + IFT (defaults)",
        lambda w: ImplicitkitModel(
            w, ik.Anderson(**FORWARD), ik.IFT(ik.Anderson(**ADJOINT), on_failure="report")
        ),
        lambda w: TorchdeqModel(w, **_torchdeq_args("anderson"), ift=True),
    ),
    Setting(
        "FixedPointIteration + JFB",
        lambda w: ImplicitkitModel(w, ik.FixedPointIteration(**FORWARD), ik.JFB()),
        lambda w: TorchdeqModel(w, **_torchdeq_args("fixed_point_iter"), grad=1),
    ),
]


@dataclass
class Row:
    setting: str
    library: str
    compile_s: float
    breaks: int
    compiled_ms: float
    eager_ms: float
    max_diff: float


def training_step(model: nn.Module, run: Callable[[Tensor], Tensor], x: Tensor) -> list[Tensor]:
    """Loss and parameter gradients of one step, detached."""
    model.zero_grad(set_to_none=True)
    loss = run(x)
    loss.backward()
    return [loss.detach()] + [p.grad.detach().clone() for p in model.parameters()]


def measure(setting: str, library: str, model: nn.Module, x: Tensor, repeats: int) -> Row:
    eager = training_step(model, model, x)
    torch._dynamo.reset()
    counters.clear()
    compiled_model = torch.compile(model)
    start = time.perf_counter()
    compiled = training_step(model, compiled_model, x)
    compile_s = time.perf_counter() - start
    breaks = sum(counters["graph_break"].values())
    max_diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(compiled, eager, strict=True))
    timings = time_interleaved(
        {
            "compiled": lambda: training_step(model, compiled_model, x),
            "eager": lambda: training_step(model, model, x),
        },
        repeats=repeats,
    )
    return Row(
        setting, library, compile_s, breaks,
        1e3 * timings["compiled"].wall_median, 1e3 * timings["eager"].wall_median, max_diff,
    )  # fmt: skip


def warm_up() -> None:
    """Compile one unrelated step first: the first compile in a process also pays inductor's one-time
    start-up (several seconds here), which would otherwise be charged to whichever row comes first."""
    layer = nn.Linear(3, 3)
    torch.compile(lambda x: layer(x).square().sum())(torch.randn(2, 3)).backward()
    torch._dynamo.reset()


def main(argv: list[str] | None = None) -> list[Row]:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--libraries", nargs="+", default=["implicitkit", "torchdeq"], help="which libraries to measure"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.repeats = 16, 4, 3
    setup(args.threads, args.seed)
    report = Report(
        args.out,
        "compile",
        f"## torch.compile of a DEQ training step: implicitkit against torchdeq 0.1.0\n\n"
        f"Command: `{command_line()}`\n\nMachine: {machine()}\n",
    )
    warm_up()
    x = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(args.seed))
    rows = []
    for setting in SETTINGS:
        for library, make in (("implicitkit", setting.implicitkit), ("torchdeq", setting.torchdeq)):
            if library not in args.libraries:
                continue
            torch.manual_seed(args.seed)
            rows.append(measure(setting.name, library, make(args.width), x, args.repeats))
            print(rows[-1], flush=True)
    table = markdown_table(
        ["setting", "library", "compile (s)", "graph breaks", "compiled step (ms)", "eager step (ms)",
         "max rel. diff to eager"],
        [[r.setting, r.library, fmt(r.compile_s), r.breaks, fmt(r.compiled_ms), fmt(r.eager_ms),
          fmt(r.max_diff)] for r in rows],
    )  # fmt: skip
    report.add(f"MLP cell, width {args.width}, batch {args.batch}, inductor (CPU)", table)
    print(f"wrote {report.write()}")
    return rows


if __name__ == "__main__":
    main()
