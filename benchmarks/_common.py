"""Shared pieces of the benchmark scripts: the cells, timing, memory, tables, plots and the machine.

Every comparison is measured side by side in one process: the candidates run in turn inside each repeat
(in a rotating order, so none always runs first), and a result is the median over repeats. Each call is
timed with two clocks: wall time, and the CPU time of the calling thread. With one intra-op thread (the
scripts' default) all of PyTorch's work runs on the calling thread, so its CPU time is the cost of the call
without the time other processes on a shared machine took from it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import implicitkit as ik

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


# -- the cells --------------------------------------------------------------------------------------------
class MLPCell(nn.Module):
    """``f(z, x) = GN(relu(z + GN(x + W2 relu(W1 z))))`` on ``[B, width]`` states.

    A residual block as deep-equilibrium models use it, GroupNorm (8 groups) keeping the iterates bounded;
    ``x`` is the injected input, ``[B, width]``. With PyTorch's default initialisation the spectral radius
    of its Jacobian at the fixed point is about 0.8: plain iteration needs 30 to 100 steps to reach a
    relative residual of 1e-4, Anderson about half as many.
    """

    def __init__(self, width: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or width
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)
        self.norm2 = nn.GroupNorm(8, width)
        self.norm3 = nn.GroupNorm(8, width)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm3(torch.relu(z + self.norm2(x + self.lin2(torch.relu(self.lin1(z))))))


class ConvCell(nn.Module):
    """The same block with 3x3 convolutions on ``[B, channels, H, W]`` states (hidden = 2x channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = 2 * channels
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, channels)
        self.norm3 = nn.GroupNorm(8, channels)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(torch.relu(self.conv1(z))))))


@dataclass
class Problem:
    """A cell with a fixed input batch: ``f(z) = cell(z, x)`` from ``z0 = 0``."""

    name: str
    cell: nn.Module
    x: Tensor

    def f(self, z: Tensor) -> Tensor:
        return self.cell(z, self.x)

    def z0(self) -> Tensor:
        return torch.zeros_like(self.x)

    @property
    def batch(self) -> int:
        return self.x.shape[0]


def make_problem(
    kind: str, width: int, batch: int, *, seed: int = 0, spatial: int = 8, dtype: torch.dtype = torch.float32
) -> Problem:
    """The ``"mlp"`` cell of a given width or the ``"conv"`` cell with ``width`` channels, with a random input.

    Weights use PyTorch's default initialisation from ``seed``; the input is standard normal.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "mlp":
        cell: nn.Module = MLPCell(width)
        shape: tuple[int, ...] = (batch, width)
        name = f"MLP w={width}"
    elif kind == "conv":
        cell = ConvCell(width)
        shape = (batch, width, spatial, spatial)
        name = f"conv c={width} {spatial}x{spatial}"
    else:
        raise ValueError(f"unknown cell kind {kind!r}; use 'mlp' or 'conv'.")
    cell = cell.to(dtype)
    return Problem(name, cell, torch.randn(shape, generator=gen).to(dtype))


# -- timing -------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall and thread-CPU seconds of the repeats of one candidate."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


class Stopwatch:
    """Accumulates wall and thread-CPU time over the calls it wraps (``with watch: ...``)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall0, self._cpu0 = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall0
        self.cpu += time.thread_time() - self._cpu0

    def reset(self) -> None:
        self.wall = self.cpu = 0.0


def time_interleaved(
    candidates: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, Timing]:
    """Time every candidate ``repeats`` times, all candidates in turn within each repeat.

    The order rotates from one repeat to the next. ``warmup`` untimed rounds come first.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            watch = Stopwatch()
            with watch:
                candidates[name]()
            timings[name].wall.append(watch.wall)
            timings[name].cpu.append(watch.cpu)
    return timings


class SavedActivations:
    """Context manager: peak bytes of the tensors autograd saves for backward, parameters excluded.

    Each saved tensor counts from when an operation saves it until its graph is freed; tensors sharing
    storage count once. Parameters (which every estimator's graph references, and which exist anyway) are
    left out, so the number is the activation memory the graph adds. It is exact and deterministic, unlike
    allocator statistics on a CPU; transient buffers that are never saved (an IFT adjoint solver's history,
    for example) are not counted.
    """

    def __init__(self, exclude: Sequence[Tensor] = ()) -> None:
        self._excluded = {p.untyped_storage().data_ptr() for p in exclude}
        self._live: dict[int, list[int]] = {}  # storage address -> [references, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack_saved)

    def __enter__(self) -> SavedActivations:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: Tensor) -> Any:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._excluded or storage.nbytes() == 0:
            return (tensor, None)
        entry = self._live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1
        return (tensor, _Release(self, key))

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._live[key]


class _Release:
    """Decrements its storage's count when the graph drops the saved tensor."""

    __slots__ = ("key", "meter")

    def __init__(self, meter: SavedActivations, key: int) -> None:
        self.meter, self.key = meter, key

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack_saved(packed: tuple[Tensor, Any]) -> Tensor:
    return packed[0]


# -- tables, plots and files ------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers should already be formatted as strings."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells for {len(headers)} headers: {row}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Collects titled markdown sections, prints each as it comes and writes them all to one file."""

    def __init__(self, out: Path, name: str, header: str) -> None:
        self.path = out / f"{name}.md"
        self.sections = [header]
        print(header, flush=True)

    def add(self, title: str, body: str) -> None:
        section = f"### {title}\n\n{body}\n"
        self.sections.append(section)
        print("\n" + section, flush=True)

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.sections))
        return self.path


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a small PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    print(f"saved {path} ({path.stat().st_size // 1024} KB)", flush=True)
    return path


def fmt(value: float, digits: int = 3) -> str:
    """A number in ``digits`` significant digits, in plain or scientific notation as fits."""
    if value != value:  # NaN
        return "nan"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    return f"{value:.{max(digits - 1, 1)}e}"


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample standard deviation) in percent, for accuracies in [0, 1]."""
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


# -- the command line and the machine -------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every script takes: ``--out``, ``--quick``, ``--threads``, ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="folder for the markdown and PNG outputs"
    )
    parser.add_argument("--quick", action="store_true", help="smallest sizes, for a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup(threads: int, seed: int) -> None:
    """Fix the thread count and the global seeds."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def machine() -> str:
    """One line naming the CPU, cores, thread setting, load, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} intra-op "
        f"thread(s), Python {sys.version.split()[0]}, implicitkit {ik.__version__}, "
        f"load average at start {load}"
    )


def checkout_prelude(root: Path, *extra_paths: Path) -> str:
    """Python source that makes a fresh process import the library from the checkout `root` (then
    `extra_paths`), and fails there if another copy is imported instead."""
    paths = [str(root), *map(str, extra_paths)]
    return (
        f"import sys; sys.path[:0] = {paths!r}; import implicitkit_det; "
        f"assert implicitkit_det.__file__.startswith({str(root)!r}), implicitkit_det.__file__; "
    )


def command_line() -> str:
    """The command that produced this run, for the record."""
    return ".venv/bin/python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
