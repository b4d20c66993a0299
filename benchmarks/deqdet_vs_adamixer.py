"""DEQDet against AdaMixer and Sparse R-CNN against DEQ Sparse R-CNN: parameters, training memory and time,
inference latency; and DEQDet's training memory with branch-wise against one-graph backward.

Every training measurement is a fresh subprocess (one intra-op thread): build the model, then train on
random images through the engine (``train_one_epoch``, one batch per call: one warm-up step, then
``--iters`` timed steps). Memory is what a user sees: the process's peak resident set size (``ru_maxrss``),
and the step's share of it, the peak above the RSS just before the first step. Time is the median step.
The same process then times inference (eval mode, no grad, one image; median of ``--iters`` calls after a
warm-up) and counts the decoder layer applications per image with forward hooks.

Rows: DEQDet against AdaMixer with 6 stages and with as many stages as DEQDet's refinement depth (12, 21);
Sparse R-CNN against DEQ Sparse R-CNN; and DEQDet with 1 or 6 RAG branches and 20 or 40 no-grad training
steps, branch-wise (the engine's default) or one graph (``--one-graph-backward``).

Run: ``.venv/bin/python benchmarks/deqdet_vs_adamixer.py [--preset paper] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import DEFAULT_OUT, command_line, machine, markdown_table

from implicitkit_det.data import DetectionBatch
from implicitkit_det.engine import build_optimizer, train_one_epoch
from implicitkit_det.models import build_model

CLASSES = 80
PAPER_STEPS = (1, 3, 6, 9, 12, 20)
# name -> (shapes of the run, per-architecture config names)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "size": 160,
        "batch": 2,
        "overrides": {},
        "configs": {
            "deqdet": "deqdet_tiny",
            "adamixer": "adamixer_tiny",
            "sparse_rcnn": "sparse_rcnn_tiny",
            "deq_sparse_rcnn": "deq_sparse_rcnn_tiny",
        },
    },
    "paper": {
        "size": 320,
        "batch": 1,
        "overrides": {"num_queries": 100},
        "configs": {
            "deqdet": "deqdet_r50_1x",
            "adamixer": "adamixer_r50_1x",
            "sparse_rcnn": "sparse_rcnn_r50_1x",
            "deq_sparse_rcnn": "deq_sparse_rcnn_r50_1x",
        },
    },
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_batch(gen: torch.Generator, batch: int, size: int) -> DetectionBatch:
    """``batch`` noise images of ``size x size`` pixels, each with 1-3 random boxes."""
    images = torch.randn(batch, 3, size, size, generator=gen)
    targets = []
    for i in range(batch):
        m = 1 + i % 3
        xy = torch.rand(m, 2, generator=gen) * 0.5
        norm = torch.cat([xy, xy + 0.1 + torch.rand(m, 2, generator=gen) * 0.4], dim=1)
        targets.append(
            {
                "boxes": norm * size,
                "boxes_normalized": norm,
                "labels": torch.randint(CLASSES, (m,), generator=gen),
                "image_id": i,
                "size": torch.tensor([size, size]),
                "orig_size": torch.tensor([size, size]),
            }
        )
    return DetectionBatch(images, torch.zeros(batch, size, size, dtype=torch.bool), targets)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "stages"):
        return list(model.stages)
    return [model.init_layer, model.refine_layer]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration's training step and inference (runs in the child process)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(spec["config"], CLASSES, **read_by(spec["config"], spec["overrides"]))
    gen = torch.Generator().manual_seed(0)
    data = [random_batch(gen, spec["batch"], spec["size"]) for _ in range(spec["iters"] + 1)]
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.01)
    cpu = torch.device("cpu")
    base = _rss_bytes()
    times = []
    for batch in data:
        start = time.perf_counter()
        train_one_epoch(
            model, [batch], optimizer, device=cpu, epoch=0, print_freq=0, branchwise=spec["branchwise"]
        )
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "peak_rss_mib": peak / 2**20,
        "step_mib": (peak - base) / 2**20,
        "step_s": statistics.median(times[1:]),
    }
    if spec.get("inference", True):
        model.eval()
        calls = [0]
        for layer in _decoder_layers(model):
            layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        image = data[0].images[:1]
        latencies = []
        with torch.no_grad():
            for i in range(spec["iters"] + 1):
                calls[0] = 0
                start = time.perf_counter()
                model(image)
                if i:
                    latencies.append(time.perf_counter() - start)
        result.update(latency_s=statistics.median(latencies), layers_per_image=calls[0])
    return result


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`measure` in a fresh interpreter, with one thread and this process's import path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parameters(config: str, **overrides: Any) -> int:
    """Parameter count, from a model built on the meta device."""
    with torch.device("meta"):
        model = build_model(config, CLASSES, **read_by(config, overrides))
    return sum(p.numel() for p in model.parameters())


def read_by(config: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The options shared by every compared detector that `config`'s architecture reads (the DEQ schedule
    is DEQDet's only)."""
    try:
        from implicitkit_det.models.registry import read_overrides
    except ImportError:  # the library of an older checkout (train_step_profile's --baseline) reads them all
        return overrides
    return read_overrides(config, overrides)[0]


def _mib(x: float) -> str:
    return f"{x:.0f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Print the tables, write them with the raw numbers under ``--out``; return the raw numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--iters", type=int, default=3, help="timed steps (and inference calls) per row")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (preset's default)")
    parser.add_argument("--batch", type=int, default=None, help="training images per step")
    parser.add_argument("--backbone", default=None, help="override the backbone, e.g. resnet18")
    parser.add_argument("--quick", action="store_true", help="a few rows at 64 px, for a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=("models", "memory"),
        default=["models", "memory"],
        help="which tables to measure",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of fresh ones (a smoke test; memory numbers then mean little)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return {}

    preset = PRESETS[args.preset]
    size = args.size or (64 if args.quick else preset["size"])
    batch = args.batch or preset["batch"]
    base = dict(preset["overrides"])
    if args.backbone:
        base["backbone"] = args.backbone
    if args.quick:
        base.update(num_queries=6, train_steps=4, supervise_steps=[1, 4])
    names = preset["configs"]
    run = measure if args.in_process else run_child

    def spec(arch: str, branchwise: bool = True, inference: bool = True, **overrides: Any) -> dict[str, Any]:
        return {
            "config": names[arch],
            "overrides": {**base, **overrides},
            "size": size,
            "batch": batch,
            "iters": 1 if args.quick else args.iters,
            "branchwise": branchwise,
            "inference": inference,
        }

    header = [
        f"# DEQDet vs AdaMixer, Sparse R-CNN vs DEQ Sparse R-CNN ({args.preset} preset)",
        "",
        f"{size} x {size} px random images, training batch {batch}, inference batch 1, {CLASSES} classes; "
        f"overrides {base or 'none'}. Machine: {machine()}.",
        f"Command: `{command_line()}`. Times are medians of {spec('deqdet')['iters']} steps on a shared "
        "machine, so expect noise of 10-20%; memory is the peak RSS of a fresh process.",
    ]
    print("\n".join(header), flush=True)

    # -- the detectors --------------------------------------------------------------------------------
    models: list[tuple[str, str, dict[str, Any]]] = [("DEQDet", "deqdet", {})]
    stage_counts = (6,) if args.quick else (6, 12, 21)
    models += [(f"AdaMixer, {n} stages", "adamixer", {"num_stages": n}) for n in stage_counts]
    if not args.quick:
        models += [("Sparse R-CNN", "sparse_rcnn", {}), ("DEQ Sparse R-CNN", "deq_sparse_rcnn", {})]
    rows, raw_models = [], []
    for label, arch, overrides in models if "models" in args.tables else []:
        n_params = parameters(names[arch], **{**base, **overrides})
        result = run(spec(arch, **overrides))
        raw_models.append({"model": label, "config": names[arch], "parameters": n_params, **result})
        rows.append(
            [
                label,
                f"{n_params / 1e6:.2f} M",
                _mib(result["peak_rss_mib"]),
                _mib(result["step_mib"]),
                f"{result['step_s']:.2f}",
                f"{1000 * result['latency_s']:.0f}",
                str(result["layers_per_image"]),
            ]
        )
        print(f"  measured {label}", flush=True)
    models_table = markdown_table(
        [
            "model",
            "parameters",
            "train: peak RSS (MiB)",
            "train: step's share (MiB)",
            "train: s/step",
            "inference: ms/image",
            "decoder layers/image",
        ],
        rows,
    )
    print("\n" + models_table, flush=True)

    # -- branch-wise against one graph ------------------------------------------------------------------
    depths = (base.get("train_steps", 20),) if args.quick else (20, 40)
    raw_memory, rows = [], []
    for steps in depths if "memory" in args.tables else ():
        full = base.get("supervise_steps", [*PAPER_STEPS[:-1], steps])
        full = [*full[:-1], steps]
        for supervised in ([steps], full):
            for branchwise in (True, False):
                label = "branch-wise" if branchwise else "one graph"
                result = run(
                    spec(
                        "deqdet",
                        branchwise=branchwise,
                        inference=False,
                        train_steps=steps,
                        supervise_steps=supervised,
                    )
                )
                raw_memory.append(
                    {"train_steps": steps, "supervise_steps": supervised, "backward": label, **result}
                )
                rows.append(
                    [
                        str(steps),
                        f"{len(supervised)} ({', '.join(map(str, supervised))})",
                        label,
                        _mib(result["peak_rss_mib"]),
                        _mib(result["step_mib"]),
                        f"{result['step_s']:.2f}",
                    ]
                )
                print(f"  measured {steps} steps, {len(supervised)} branch(es), {label}", flush=True)
    memory_table = markdown_table(
        [
            "train steps",
            "RAG branches (steps)",
            "backward",
            "peak RSS (MiB)",
            "step's share (MiB)",
            "s/step",
        ],
        rows,
    )
    print("\n" + memory_table, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"deqdet_vs_adamixer_{args.preset}" + ("_quick" if args.quick else "")
    report = "\n".join(
        [
            *header,
            "",
            "## The detectors",
            "",
            models_table,
            "",
            "## DEQDet's training memory: branch-wise against one graph",
            "",
            memory_table,
            "",
        ]
    )
    (args.out / f"{stem}.md").write_text(report)
    raw = {"preset": args.preset, "size": size, "batch": batch, "overrides": base}
    raw.update(models=raw_models, memory=raw_memory)
    (args.out / f"{stem}.json").write_text(json.dumps(raw, indent=1))
    return raw


if __name__ == "__main__":
    main()
