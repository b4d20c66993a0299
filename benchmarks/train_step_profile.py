"""The digits demo's training step, part by part, and the levers that make it faster.

Everything runs in one process with one intra-op thread, on the same batches of the demo's own data
(its command line: ``deqdet_tiny``, 10 queries, 16 points, 6 no-grad steps, RAG branches after 1, 3, 6,
batch 4, 128-192 px), through the engine's ``train_step``:

1. **Parts** of the plain float32 step (branch-wise, as the engine trains): backbone and neck forward and
   backward, the init group, the no-grad solve, the RAG branches, matching and criterion, the optimizer;
   thread-CPU milliseconds, medians over the steps.
2. **Levers**, side by side in rotating order (one model per variant, the same initial weights and
   batches): RAG branches stacked along the batch (``stack_rag_branches``), bfloat16 autocast for the backbone
   and neck (``--amp``) or the whole forward (``--amp --amp-decoder``); the median step time, the speed-up
   over float32, and the ATen operator calls of one step (forward and backward, counted below autograd).
3. **Memory** of stacked RAG branches at paper shape (``deqdet_r50_1x`` on a ResNet-18, 320 px, batch 2):
   the peak RSS of a fresh process per row, branches one at a time (the default) against stacked.

Run: ``.venv/bin/python benchmarks/train_step_profile.py [--steps 40] [--quick]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from _common import Report, Timing, base_parser, command_line, machine, markdown_table, setup
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
from implicitkit_det.recipes import digits_recipe

CPU = torch.device("cpu")
#: name -> (model overrides, amp, amp for the decoder too)
VARIANTS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "float32": ({"stack_rag_branches": False}, False, False),
    "stacked RAG branches": ({"stack_rag_branches": True}, False, False),
    "bf16 backbone + neck": ({"stack_rag_branches": False}, True, False),
    "bf16 backbone + neck, stacked RAG": ({"stack_rag_branches": True}, True, False),
    "bf16 whole forward": ({"stack_rag_branches": False}, True, True),
    "bf16 whole forward, stacked RAG": ({"stack_rag_branches": True}, True, True),
}


def demo_batches(count: int) -> tuple[Any, list[DetectionBatch]]:
    """The demo's run config and its first `count` training batches (no workers, the epoch-0 order)."""
    # The demo starts from a pre-trained backbone, whose stem and first stage are frozen; the weights do not
    # change the cost, so the same freezing stands in for them without pre-training one here.
    argv = [*digits_recipe(pretrained=False), "--workers", "0", "--skip-image-check"]
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
    for index in range(1 + len(model.supervise_steps)):
        name = "init group (G, F(G), F(F(G)))" if index == 0 else "RAG branches"
        with clock.part(f"{name} forward"):
            group = next(groups)
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


def parts_table(cfg: Any, data: Any, batches: list[DetectionBatch]) -> str:
    model, optimizer = build(cfg, data, {"stack_rag_branches": False}, False)
    clock = PartClock()
    model.solve = clock.timed("no-grad refinement steps (+ RAP)", model.solve)
    for batch in batches:
        profiled_step(model, optimizer, batch, clock)
    steps = clock.steps[1:]  # the first step warms up
    totals = [sum(step.values()) for step in steps]
    names = list(steps[0])
    medians = {name: statistics.median(step[name] for step in steps) for name in names}
    # The solve and the matcher run inside the group forwards / the criterion: shown on their own rows.
    medians["RAG branches forward"] -= medians["no-grad refinement steps (+ RAP)"]
    whole = statistics.median(totals) - medians["no-grad refinement steps (+ RAP)"]
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
    runs = {
        name: build(cfg, data, overrides, amp_decoder)
        for name, (overrides, _, amp_decoder) in VARIANTS.items()
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


# -- 3. memory at paper shape ---------------------------------------------------------------------------------
def memory_table(quick: bool) -> str:
    """Peak RSS of one paper-shape DEQDet step (ResNet-18 backbone, 100 queries, 20 no-grad steps, 6 RAG
    branches), branches one at a time against stacked, each in a fresh process."""
    size, overrides = (
        (64, {"num_queries": 10, "train_steps": 4, "supervise_steps": [1, 4]}) if quick else (320, {})
    )
    rows = []
    for stacked in (False, True):
        spec = {
            "config": "deqdet_r50_1x",
            "overrides": {"backbone": "resnet18", "stack_rag_branches": stacked, **overrides},
            "batch": 2, "size": size, "iters": 1, "branchwise": True, "inference": False,
        }  # fmt: skip
        result = run_child(spec)
        name = "stacked (one group of all branches)" if stacked else "one branch at a time (default)"
        rows.append(
            [name, f"{result['peak_rss_mib']:.0f}", f"{result['step_mib']:.0f}", f"{result['step_s']:.1f}"]
        )
    return markdown_table(["RAG branches", "peak RSS MiB", "step's share MiB", "step s (wall)"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (one more warms up)")
    parser.add_argument("--no-memory", action="store_true", help="skip the paper-shape memory rows")
    args: argparse.Namespace = parser.parse_args(argv)
    setup(args.threads, args.seed)
    steps = 3 if args.quick else args.steps
    (cfg, data), batches = demo_batches(steps + 1)
    report = Report(
        args.out, "train_step_profile", f"# Training step profile\n\n{machine()}\n\n`{command_line()}`\n"
    )
    report.add("Parts of the float32 step (branch-wise)", parts_table(cfg, data, batches))
    report.add("Levers, side by side", levers_table(cfg, data, batches))
    if not args.no_memory:
        report.add(
            "Stacked RAG branches: memory at paper shape (fresh process per row)", memory_table(args.quick)
        )
    report.write()


if __name__ == "__main__":
    main()
