"""Why a detector's AP changes with its test-time refinement steps: what its detections do step by step.

For a trained checkpoint (``checkpoint_last.pth`` of a run, or its folder), on the val split of the run's
data (the digits set by default), after each refinement step 0..N, with the model's own post-processing:

- ``AP``: COCO AP (the refinement curve);
- ``found``: the share of objects with a correct detection (same class, IoU > 0.5) scored above 0.3;
- ``best IoU``: the mean over objects of the best IoU of a same-class prediction;
- ``best score``: the mean over objects of the best score of a correct prediction;
- ``duplicates``: the share of objects with two or more correct detections scored above 0.3;
- ``box move``: the mean change of the predicted boxes from the previous step, in pixels.

The rows before post-processing (``duplicates`` above all) tell duplicates from drifting boxes or
shrinking scores; ``docs/deqdet.md`` reads them for the digits demo.

Run: ``.venv/bin/python benchmarks/refinement_duplicates.py outputs/deqdet_digits_demo [--steps 12]``
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from _common import markdown_table
from torchvision.ops import box_iou

from implicitkit_det import cli
from implicitkit_det.data import DetectionBatch
from implicitkit_det.engine.predict import load_detector
from implicitkit_det.engine.refinement import refinement_curve
from implicitkit_det.engine.run_config import build_run_config
from implicitkit_det.engine.run_setup import load_data, make_eval_loader
from implicitkit_det.recipes import digits_recipe

CONFIDENT = 0.3


@torch.no_grad()
def step_statistics(model: Any, loader: Iterable[DetectionBatch], steps: int) -> list[dict[str, float]]:
    """Per refinement step 0..`steps`, the per-object and per-image statistics of the module docstring."""
    sums: list[dict[str, float]] = [defaultdict(float) for _ in range(steps + 1)]
    for batch in loader:
        sizes = model.image_sizes(batch.images, mask=batch.mask)
        features = model.features(batch.images)
        state, previous = model.queries(sizes), None
        for n, layer in zip(range(steps + 1), model.refinement_layers(), strict=False):
            state = layer(state, features, sizes)
            out = layer.predict(state, sizes)
            scale = torch.cat([sizes.flip(-1), sizes.flip(-1)], -1)[:, None]  # (w, h, w, h) per image
            boxes = out["pred_boxes"] * scale
            for i, target in enumerate(batch.targets):
                _add_image(sums[n], out["pred_logits"][i].sigmoid(), boxes[i], target, scale[i])
            if previous is not None:
                sums[n]["box move"] += float((boxes - previous).abs().mean(-1).mean(-1).sum())
            sums[n]["images"] += len(batch.targets)
            previous = boxes
    return [_averages(s) for s in sums]


def _add_image(
    sums: dict[str, float], prob: torch.Tensor, boxes: torch.Tensor, target: Any, scale: Any
) -> None:
    gt, labels = target["boxes_normalized"] * scale, target["labels"]
    sums["objects"] += len(labels)
    if not len(labels):
        return
    score, cls = prob.max(-1)
    same = cls[:, None] == labels[None, :]
    iou = box_iou(boxes, gt)
    correct = same & (iou > 0.5)
    best_score = torch.where(correct, score[:, None], torch.zeros(())).max(0).values
    sums["found"] += float((best_score > CONFIDENT).sum())
    sums["best score"] += float(best_score.sum())
    sums["best IoU"] += float(torch.where(same, iou, torch.zeros(())).max(0).values.sum())
    sums["duplicates"] += float(((correct & (score[:, None] > CONFIDENT)).sum(0) >= 2).sum())


def _averages(s: dict[str, float]) -> dict[str, float]:
    objects, images = max(s["objects"], 1.0), max(s["images"], 1.0)
    out = {k: s[k] / objects for k in ("found", "best IoU", "best score", "duplicates")}
    out["box move"] = s["box move"] / images
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a run folder or checkpoint file")
    parser.add_argument("--steps", type=int, default=12, help="the last refinement step scored")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_detector(args.checkpoint).model
    options = [*digits_recipe(pretrained=False), "--workers", "0", "--skip-image-check"]
    p = cli.build_parser()
    cfg = build_run_config(vars(p.parse_args(options)), cli.given_options(p, options))
    data = load_data(cfg, train=False)
    loader = make_eval_loader(cfg, data.val, torch.device("cpu"), True)
    curve = refinement_curve(
        model, loader, data.val.coco, max_steps=args.steps, device=torch.device("cpu"),
        label_to_category_id=data.val.label_to_category_id,
    )  # fmt: skip
    stats = step_statistics(model, loader, args.steps)
    names = ["found", "best IoU", "best score", "duplicates", "box move"]
    rows = [
        [n, f"{c['AP']:.3f}", *(f"{s[k]:.3f}" for k in names)] for n, (c, s) in enumerate(zip(curve, stats))
    ]
    table = markdown_table(["step", "AP", *names], rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
