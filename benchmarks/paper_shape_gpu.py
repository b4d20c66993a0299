"""Paper-shape training on a GPU: DEQDet and AdaMixer (ResNet-50, 100 queries, ~800 px), a few hundred steps.

What a user with one GPU sees when training the published configurations, measured on the bundled digits
set scaled to COCO's input size (shorter side 800, longer at most 1333; there is no COCO here): the loss
after every step, the time per step (median after a warm-up, CUDA synchronised) and
``torch.cuda.max_memory_allocated`` of the training steps, with fp16 autocast + gradient scaling
(``--amp``) and in fp32. Both models train through the engine's ``train_one_epoch`` with their own
optimiser recipe, from random initialisation (no ImageNet weights here), batch 2.

Run: ``python benchmarks/paper_shape_gpu.py --iters 300 --out benchmarks/results`` (needs CUDA). Writes
``paper_shape_gpu.json``, ``paper_shape_gpu.md`` and ``paper_shape_gpu.png`` (loss curves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import markdown_table
from torch.utils.data import DataLoader

from implicitkit_det.data import (
    CocoDetectionDataset,
    build_digits_detection,
    collate_detection,
    make_train_transforms,
)
from implicitkit_det.engine import build_optimizer, make_grad_scaler, recipe_for, train_one_epoch
from implicitkit_det.models import CONFIGS, build_model

CONFIG_NAMES = ("deqdet_r50_1x", "adamixer_r50_1x")


def _loader(batch: int, workers: int) -> DataLoader:
    files = build_digits_detection()
    dataset = CocoDetectionDataset(
        files.images("train"),
        files.annotations("train"),
        transforms=make_train_transforms(scales=(800,), max_size=1333, hflip_prob=0.0),
    )
    generator = torch.Generator().manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=generator,
        num_workers=workers,
        collate_fn=partial(collate_detection, size_divisor=32),
        pin_memory=True,
        persistent_workers=workers > 0,
    )


def train_run(config: str, *, amp: bool, iters: int, batch: int, workers: int) -> dict[str, Any]:
    """Train `config` for `iters` steps; the loss per step, median step time and peak CUDA memory."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(config, num_classes=10).to(device)
    recipe = recipe_for(CONFIGS[config].arch)
    optimizer = build_optimizer(
        model,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        decoder_lr_mult=recipe.decoder_lr_mult,
        decoder_wd_mult=recipe.decoder_wd_mult,
    )
    scaler = make_grad_scaler(device, amp)
    losses, times = [], []
    batches = iter(_loader(batch, workers))
    torch.cuda.reset_peak_memory_stats()
    for step in range(iters):
        try:
            one = next(batches)
        except StopIteration:
            batches = iter(_loader(batch, workers))
            one = next(batches)
        torch.cuda.synchronize()
        start = time.perf_counter()
        stats = train_one_epoch(
            model, [one], optimizer, device=device, epoch=0, amp=amp, scaler=scaler,
            clip_max_norm=recipe.clip_max_norm, print_freq=10**9, log=lambda _: None,
        )  # fmt: skip
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(stats["loss"])
        if step == 0:
            torch.cuda.reset_peak_memory_stats()  # the first step also holds one-time allocations
    return {
        "config": config,
        "amp": amp,
        "iters": iters,
        "batch": batch,
        "step_ms": 1000 * statistics.median(times[5:] or times),
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
        "loss": losses,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        label = f"{run['config']} ({'fp16 AMP' if run['amp'] else 'fp32'})"
        ax.plot(run["loss"], label=label, alpha=0.8)
    ax.set(xlabel="training step (batch 2, ~800 px)", ylabel="total loss (all supervised branches)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Paper-shape training on one GPU (digits set scaled to COCO size)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--fp32-iters", type=int, default=30, help="steps of the fp32 rows (time, memory)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("paper_shape_gpu.py measures CUDA memory and speed: it needs a GPU")
    runs = []
    for config in CONFIG_NAMES:
        for amp, iters in ((True, args.iters), (False, args.fp32_iters)):
            run = train_run(config, amp=amp, iters=iters, batch=args.batch, workers=args.workers)
            print(f"{config} amp={amp}: {run['step_ms']:.0f} ms/step, {run['peak_mib']:.0f} MiB", flush=True)
            runs.append(run)
    args.out.mkdir(parents=True, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    (args.out / "paper_shape_gpu.json").write_text(json.dumps({"machine": info, "runs": runs}, indent=1))
    rows = [
        [r["config"], "fp16 AMP" if r["amp"] else "fp32", f"{r['params_m']:.2f}", r["iters"],
         f"{r['step_ms']:.0f}", f"{r['peak_mib']:.0f}", f"{r['loss'][0]:.2f} -> {statistics.mean(r['loss'][-20:]):.2f}"]
        for r in runs
    ]  # fmt: skip
    header = ["config", "precision", "params (M)", "steps", "ms/step", "peak MiB", "loss first -> last 20"]
    table = f"{info['device']}, torch {info['torch']}\n\n" + markdown_table(header, rows)
    (args.out / "paper_shape_gpu.md").write_text(table + "\n")
    print(table)
    plot([r for r in runs if r["amp"]], args.out / "paper_shape_gpu.png")


if __name__ == "__main__":
    main()
