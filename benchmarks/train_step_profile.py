"""The digits demo's training step, part by part, and the levers that make it faster.

Everything runs in one process with one intra-op thread, on the same batches of the demo's own data
(its command line: ``deqdet_tiny``, 10 queries, 16 points, 6 no-grad steps, RAG branches after 1, 3, 6,
batch 4, 128-192 px; ``--config`` picks another tiny detector with its own demo recipe), through the
engine's ``train_step``:

1. **Parts** of the plain float32 step as the engine trains it on CPU (a DEQ detector's branches stacked):
   backbone and neck forward and backward, the decoder's groups, the no-grad solve, matching and criterion,
   the optimizer; thread-CPU milliseconds, medians over the steps.
2. **Levers**, side by side in rotating order (one model per variant, the same initial weights and
   batches): a DEQ detector's branches one group at a time or stacked along the batch (``stack_branches``),
   bfloat16 autocast for the backbone and neck (``--amp``) or the whole forward (``--amp --amp-decoder``);
   the median step time, the speed-up over float32 with one group per branch, and the ATen operator calls
   of one step (forward and backward, counted below autograd).
3. **Against another version** (``--baseline DIR``, a checkout of another commit): the config's recipe in
   float32 and in its own precision, timed by this file's code in fresh one-thread processes that import
   the library from this checkout and from ``DIR`` in turn (rounds in alternating order), each with the
   host-memory settings its training runs use (:mod:`implicitkit_det.engine.host_memory`, where the
   version has it); the median step time and the ATen calls of each.
4. **Memory** of stacked branches at paper shape (``deqdet_r50_1x`` on a ResNet-18, 320 px, batch 2):
   the peak RSS of a fresh process per row, one group per branch (the default off CPU) against stacked.

Run: ``.venv/bin/python benchmarks/train_step_profile.py [--config NAME] [--steps 40] [--baseline DIR]
[--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _common import (
    Report,
    Timing,
    base_parser,
    checkout_prelude,
    command_line,
    machine,
    markdown_table,
    setup,
)
from deqdet_vs_adamixer import run_child
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import implicitkit as ik
from implicitkit_det import cli
from implicitkit_det.data import DetectionBatch
from implicitkit_det.engine import train_step
from implicitkit_det.engine.optim import adamw, param_groups
from implicitkit_det.engine.run_config import build_run_config
from implicitkit_det.engine.run_setup import build_run_model, load_data, make_train_loader
from implicitkit_det.models import CONFIGS, architecture_of
from implicitkit_det.recipes import digits_recipe

CPU = torch.device("cpu")
DEMO_CONFIGS = ("deqdet_tiny", "adamixer_tiny", "sparse_rcnn_tiny", "deq_sparse_rcnn_tiny")
#: name -> (model overrides, amp, amp for the decoder too)
VARIANTS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "float32": ({"stack_branches": False}, False, False),
    "float32, stacked branches": ({"stack_branches": True}, False, False),
    "bf16 backbone + neck": ({"stack_branches": False}, True, False),
    "bf16 backbone + neck, stacked branches": ({"stack_branches": True}, True, False),
    "bf16 whole forward": ({"stack_branches": False}, True, True),
    "bf16 whole forward, stacked branches": ({"stack_branches": True}, True, True),
}


def demo_batches(count: int, config: str = "deqdet_tiny") -> tuple[Any, list[DetectionBatch]]:
    """The demo's run config for `config` (its recipe) and its first `count` training batches (no workers,
    the epoch-0 order)."""
    # The demo starts from a pre-trained backbone, whose stem and first stage are frozen; the weights do not
    # change the cost, so the same freezing stands in for them without pre-training one here.
    argv = [*digits_recipe(config, pretrained=False), "--workers", "0", "--skip-image-check"]
    argv += ["--model-arg", "frozen_stages=1"]
    parser = cli.build_parser()
    cfg = build_run_config(vars(parser.parse_args(argv)), cli.given_options(parser, argv))
    data = load_data(cfg, train=True)
    loader = make_train_loader(cfg, data.train, CPU)
    loader.batch_sampler.set_epoch(0, start=0, stop=count)  # type: ignore[union-attr]
    batches = [batch for _, batch in zip(range(count), loader, strict=False)]
    return (cfg, data), batches


def build(cfg: Any, data: Any, overrides: dict[str, Any], amp_decoder: bool) -> tuple[torch.nn.Module, Any]:
    """The demo's model and optimizer (the engine's recipe), with `overrides`, from seed 0."""
    torch.manual_seed(0)
    run_cfg = copy.copy(cfg)
    object.__setattr__(run_cfg, "overrides", {**cfg.overrides, **overrides})
    object.__setattr__(run_cfg, "amp_decoder", amp_decoder)
    model = build_run_model(run_cfg, data.val.num_classes, CPU).train()
    groups = param_groups(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, decoder_lr_mult=cfg.decoder_lr_mult,
        decoder_wd_mult=cfg.decoder_wd_mult,
    )  # fmt: skip
    return model, adamw(groups, lr=cfg.lr)


def keep_host_memory_as_training_does() -> None:
    """What the library's `fit` does before its first step (nothing for a version without it)."""
    with contextlib.suppress(ImportError):
        from implicitkit_det.engine.host_memory import keep_freed_host_memory

        keep_freed_host_memory()


class OpCounter(TorchDispatchMode):
    """Counts the ATen operator calls dispatched below autograd (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


# -- 1. parts ------------------------------------------------------------------------------------------------
class PartClock:
    """Thread-CPU milliseconds per named part, one list per step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def new_step(self) -> None:
        self.steps.append(defaultdict(float))

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.thread_time()
        try:
            yield
        finally:
            self.steps[-1][name] += 1e3 * (time.thread_time() - start)

    def rename(self, old: str, new: str) -> None:
        """Move the time of part `old` of this step to `new` (named once its work is known)."""
        self.steps[-1][new] += self.steps[-1].pop(old)

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return wrapper


def graph_nodes(roots: list[torch.Tensor]) -> int:
    """The autograd nodes reachable from `roots` (each counted once)."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return len(seen)


def profiled_step(
    model: Any, optimizer: Any, batch: DetectionBatch, clock: PartClock, nodes: list[int] | None = None
) -> None:
    """The engine's branch-wise step written out, each part under its clock; with `nodes`, the autograd
    nodes of every graph the step builds are appended to it."""
    clock.new_step()
    optimizer.zero_grad(set_to_none=True)
    images, targets = batch.images, batch.targets
    with clock.part("backbone + neck forward"):
        sizes = model.image_sizes(images, targets, batch.mask)
        features = model.features(images)
    shared = ik.SharedInputs(list(features))
    (copies,) = shared.inputs
    groups = model.training_branches(copies, sizes)
    while True:
        with clock.part("decoder group forward"):
            group = next(groups, None)
        if group is None:
            clock.steps[-1].pop("decoder group forward")
            break
        name = group_label(group)
        clock.rename("decoder group forward", f"{name} forward")
        with clock.part("matching + criterion"):
            loss = model.losses(group, targets)["loss"]
        if nodes is not None:
            nodes.append(graph_nodes([loss]))
        with clock.part(f"{name} backward"):
            loss.backward()
    sources, grads = shared.take_gradients()
    if nodes is not None:
        nodes.append(graph_nodes(list(sources)))
    with clock.part("backbone + neck backward"):
        torch.autograd.backward(sources, grads)
    with clock.part("clipping + AdamW"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


def group_label(group: dict[str, Any]) -> str:
    """A row name for a group of supervised branches, by what the detector calls them."""
    names = list(group)
    if names[0] == "init" and any(name.startswith("rag") for name in names):
        return "every branch, stacked (G, then F on the stacked rows)"
    if names[0] == "init":
        return "init group (G, F(G), F(F(G)))"
    if all(name.startswith("rag") for name in names):
        return "RAG branches"
    return f"decoder stages ({len(names)})"


def parts_table(cfg: Any, data: Any, batches: list[DetectionBatch]) -> str:
    model, optimizer = build(cfg, data, {}, False)
    clock = PartClock()
    solve = "no-grad refinement steps (+ RAP)"
    if hasattr(model, "solve"):  # a DEQ detector: its no-grad solve runs inside a group's forward
        model.solve = clock.timed(solve, model.solve)
    for batch in batches:
        profiled_step(model, optimizer, batch, clock)
    steps = clock.steps[1:]  # the first step warms up
    totals = [sum(step.values()) for step in steps]
    names = list(steps[0])
    medians = {name: statistics.median(step[name] for step in steps) for name in names}
    # The solve runs inside the forward of the group that holds the RAG branches: shown on its own row.
    whole = statistics.median(totals)
    if solve in medians:
        outer = next(n for n in names if n.endswith(" forward") and ("RAG" in n or "stacked" in n))
        medians[outer] -= medians[solve]
        whole -= medians[solve]
    rows = [[name, f"{ms:.1f}", f"{100 * ms / whole:.0f}%"] for name, ms in medians.items()]
    rows.append(["**step**", f"{whole:.1f}", "100%"])
    table = markdown_table(["part", "ms (thread CPU)", "share"], rows)
    backbone_ms = medians["backbone + neck forward"] + medians["backbone + neck backward"]
    return table + "\n\n" + work_summary(model, optimizer, batches[0], whole, backbone_ms)


def work_summary(
    model: Any, optimizer: Any, batch: DetectionBatch, step_ms: float, backbone_ms: float
) -> str:
    """FLOPs of one step (forward and backward), the backbone and neck's share and rate, autograd nodes."""
    nodes: list[int] = []
    with FlopCounterMode(display=False) as flops:
        profiled_step(model, optimizer, batch, PartClock(), nodes)
    by_module = flops.get_flop_counts()
    total = flops.get_total_flops()
    # The step calls the backbone and the neck directly: the counter names them by their classes.
    parts = {type(model.backbone).__name__, type(model.neck).__name__}
    backbone = sum(sum(by_module[name].values()) for name in parts if name in by_module)
    return (
        f"One step: {total / 1e9:.2f} GFLOP forward and backward, of which backbone and neck "
        f"{backbone / 1e9:.2f} GFLOP at {backbone / 1e6 / backbone_ms:.1f} GFLOP/s and the rest "
        f"{(total - backbone) / 1e9:.2f} GFLOP at {(total - backbone) / 1e6 / (step_ms - backbone_ms):.1f} "
        f"GFLOP/s; {sum(nodes)} autograd nodes ({nodes[-1]} in the backbone and neck's graph)."
    )


# -- 2. levers ----------------------------------------------------------------------------------------------
def levers_table(cfg: Any, data: Any, batches: list[DetectionBatch]) -> str:
    deq = architecture_of(CONFIGS[cfg.config].arch).deq  # stacked branches need a DEQ path
    runs = {
        name: build(cfg, data, overrides, amp_decoder)
        for name, (overrides, _, amp_decoder) in VARIANTS.items()
        if deq or not overrides["stack_branches"]
    }
    calls = {}
    for name, (model, optimizer) in runs.items():
        counter = OpCounter()
        with counter:
            one_step(name, model, optimizer, batches[0])
        calls[name] = counter.calls
    timings = {name: Timing() for name in runs}
    names = list(runs)
    for i, batch in enumerate(batches[1:]):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            one_step(name, *runs[name], batch)
            timings[name].wall.append(time.perf_counter() - wall0)
            timings[name].cpu.append(time.thread_time() - cpu0)
    base = timings["float32"].cpu_median
    rows = [
        [
            name,
            f"{1e3 * t.cpu_median:.1f}",
            f"{1e3 * t.wall_median:.1f}",
            f"x{base / t.cpu_median:.2f}",
            calls[name],
        ]
        for name, t in timings.items()
    ]
    return markdown_table(
        ["variant", "step ms (thread CPU)", "step ms (wall)", "speed-up", "ATen calls"], rows
    )


def one_step(name: str, model: Any, optimizer: Any, batch: DetectionBatch) -> None:
    amp = VARIANTS[name][1]
    train_step(model, batch, optimizer, device=CPU, epoch=0, iteration=0, amp=amp, clip_max_norm=1.0)


# -- 3. against another version ------------------------------------------------------------------------------
HERE = Path(__file__).resolve().parent


def version_timings(config: str, steps: int) -> dict[str, dict[str, float]]:
    """This process's library: median thread-CPU ms and ATen calls of the recipe's step, float32 and in the
    recipe's own precision (what :func:`versions_table` runs in each version's process)."""
    torch.set_num_threads(1)
    keep_host_memory_as_training_does()
    (cfg, data), batches = demo_batches(steps + 1, config)
    out = {}
    for label, amp in [("float32", False), *([("the recipe's precision", True)] if cfg.amp else [])]:
        model, optimizer = build(cfg, data, {}, cfg.amp_decoder)  # the recipe's model, from seed 0
        step = functools.partial(
            train_step,
            model,
            optimizer=optimizer,
            device=CPU,
            epoch=0,
            iteration=0,
            amp=amp,
            clip_max_norm=1.0,
        )
        counter = OpCounter()
        with counter:
            step(batches[0])
        times = []
        for batch in batches[1:]:
            start = time.thread_time()
            step(batch)
            times.append(1e3 * (time.thread_time() - start))
        out[label] = {"ms": statistics.median(times), "calls": counter.calls}
    return out


def _timings_of(root: Path, config: str, steps: int) -> dict[str, dict[str, float]]:
    """:func:`version_timings` in a fresh process whose library comes from the checkout `root`."""
    code = (
        checkout_prelude(root, HERE)
        + f"import json, train_step_profile as t; print(json.dumps(t.version_timings({config!r}, {steps})))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"timing the checkout {root} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def versions_table(config: str, baseline: Path, steps: int, rounds: int = 3) -> str:
    """This checkout against `baseline`, `rounds` processes each in alternating order."""
    trees = [("this checkout", HERE.parent), (f"baseline ({baseline})", baseline.resolve())]
    runs: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name, _ in trees}
    for r in range(rounds):
        for name, root in trees if r % 2 == 0 else trees[::-1]:
            runs[name].append(_timings_of(root, config, steps))
    (this, _), (base, _) = trees
    rows = []
    for variant in runs[this][0]:
        ms = {name: statistics.median(run[variant]["ms"] for run in runs[name]) for name in runs}
        calls = {name: runs[name][0][variant]["calls"] for name in runs}
        rows.append(
            [variant, f"{ms[base]:.1f}", f"{ms[this]:.1f}", f"x{ms[base] / ms[this]:.2f}", int(calls[base]),
             int(calls[this])]
        )  # fmt: skip
    headers = ["precision", "baseline ms", "this ms", "speed-up", "baseline ATen calls", "this ATen calls"]
    return markdown_table(headers, rows) + (
        f"\n\nMedian thread-CPU ms of {steps} steps per process, median over {rounds} processes per version."
    )


# -- 4. memory at paper shape ---------------------------------------------------------------------------------
def memory_table(quick: bool) -> str:
    """Peak RSS of one paper-shape DEQDet step (ResNet-18 backbone, 100 queries, 20 no-grad steps, 6 RAG
    branches), one group per branch against every branch stacked, each in a fresh process."""
    size, overrides = (
        (64, {"num_queries": 10, "train_steps": 4, "supervise_steps": [1, 4]}) if quick else (320, {})
    )
    rows = []
    for stacked in (False, True):
        spec = {
            "config": "deqdet_r50_1x",
            "overrides": {"backbone": "resnet18", "stack_branches": stacked, **overrides},
            "batch": 2, "size": size, "iters": 1, "branchwise": True, "inference": False,
        }  # fmt: skip
        result = run_child(spec)
        name = (
            "stacked (one group of every branch)" if stacked else "one group per branch (the paper presets)"
        )
        rows.append(
            [name, f"{result['peak_rss_mib']:.0f}", f"{result['step_mib']:.0f}", f"{result['step_s']:.1f}"]
        )
    return markdown_table(["branches", "peak RSS MiB", "step's share MiB", "step s (wall)"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (one more warms up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the paper-shape memory rows")
    parser.add_argument(
        "--baseline", type=Path, default=None, help="a checkout of another version, timed side by side"
    )
    parser.add_argument(
        "--config",
        default="deqdet_tiny",
        choices=DEMO_CONFIGS,
        help="the tiny detector, with its demo recipe",
    )
    args: argparse.Namespace = parser.parse_args(argv)
    setup(args.threads, args.seed)
    keep_host_memory_as_training_does()
    steps = 3 if args.quick else args.steps
    (cfg, data), batches = demo_batches(steps + 1, args.config)
    name = "train_step_profile" + ("" if args.config == "deqdet_tiny" else f"_{args.config}")
    title = f"# Training step profile: {args.config}, its demo recipe"
    report = Report(args.out, name, f"{title}\n\n{machine()}\n\n`{command_line()}`\n")
    report.add("Parts of the float32 step (as the engine trains on CPU)", parts_table(cfg, data, batches))
    report.add("Levers, side by side", levers_table(cfg, data, batches))
    if args.baseline is not None:
        report.add(
            f"Against {args.baseline}",
            versions_table(args.config, args.baseline, steps, 1 if args.quick else 3),
        )
    if not args.no_memory and args.config == "deqdet_tiny":
        report.add(
            "Stacked branches: memory at paper shape (fresh process per row)", memory_table(args.quick)
        )
    report.write()


if __name__ == "__main__":
    main()
