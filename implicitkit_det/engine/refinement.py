"""The refinement curve: a DEQ detector's AP after 0, 1, ..., N refinement steps at test, in one pass."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DetectionBatch
from ..evaluation import CocoEvaluator, to_coco_results
from .evaluate import rescale_to_original
from .process_group import unwrap

__all__ = ["plot_refinement_curve", "refinement_curve", "save_refinement_curve"]


@torch.no_grad()
def refinement_curve(
    model: nn.Module,
    loader: Iterable[DetectionBatch],
    coco_gt: Any,
    *,
    max_steps: int,
    device: torch.device,
    label_to_category_id: Sequence[int] | None = None,
) -> list[dict[str, float]]:
    """COCO AP of ``y_n = F^n(G(q_0))`` for ``n = 0 .. max_steps``: the paper's refinement-awareness figure.

    Each batch goes through the backbone, ``G`` and ``max_steps`` applications of ``F`` once; the prediction
    after every step is scored by its own evaluator, so the whole curve costs one evaluation at
    ``max_steps`` (``n = 0`` is ``G``'s own prediction).

    **Arguments**
    - `model`: a DEQ detector (:class:`~implicitkit_det.models.DEQDet` or a subclass), plain or in DDP.
    - `loader`: yields evaluation batches with ``image_id``, ``size`` and ``orig_size`` in the targets.
    - `coco_gt`: the ground truth (``dataset.coco``).
    - `max_steps`: the last step scored; beyond the training depth shows whether AP holds.
    - `label_to_category_id`: the dataset's map from labels to category ids.

    **Returns** one dict per step: ``steps``, ``AP``, ``AP50``, ``AP75``.
    """
    model = unwrap(model).eval()
    if not all(hasattr(model, name) for name in ("init_layer", "refine_layer", "queries")):
        raise TypeError(
            f"the refinement curve needs a DEQ detector with an init layer G and a refinement layer F "
            f"(DEQDet, DEQSparseRCNN); got {type(model).__name__}"
        )
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    evaluators = [CocoEvaluator(coco_gt) for _ in range(max_steps + 1)]
    for batch in loader:
        batch = batch.to(device)
        sizes = model.image_sizes(batch.images, mask=batch.mask)
        features = model.features(batch.images)
        ids = [t["image_id"] for t in batch.targets]
        state = model.init_layer(model.queries(sizes), features, sizes)
        for n, evaluator in enumerate(evaluators):
            if n > 0:
                state = model.refine_layer(state, features, sizes)
            layer = model.init_layer if n == 0 else model.refine_layer
            detections = rescale_to_original(
                model.postprocess(layer.predict(state, sizes), sizes), batch.targets
            )
            evaluator.update(to_coco_results(detections, ids, label_to_category_id), image_ids=ids)
    curve = []
    for n, evaluator in enumerate(evaluators):
        evaluator.synchronize()
        stats = evaluator.summarize(verbose=False)
        curve.append({"steps": n, "AP": stats["AP"], "AP50": stats["AP50"], "AP75": stats["AP75"]})
    return curve


def plot_refinement_curve(
    curve: Sequence[dict[str, float]], path: str | os.PathLike, *, train_depth: int | None = None
) -> Path:
    """AP and AP50 against test-time refinement steps, with the training depth marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["steps"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    ax.plot(steps, [p["AP"] for p in curve], marker="o", ms=3, label="AP")
    ax.plot(steps, [p["AP50"] for p in curve], marker="s", ms=3, label="AP50")
    if train_depth is not None:
        ax.axvline(train_depth, color="grey", ls="--", lw=1, label=f"training depth ({train_depth})")
    ax.set(xlabel="refinement steps at test", ylabel="COCO AP", ylim=(0, 1), title="Refinement curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_refinement_curve(
    curve: Sequence[dict[str, float]], out_dir: str | os.PathLike, *, train_depth: int | None = None
) -> tuple[Path, Path]:
    """Write ``refinement_curve.json`` and ``refinement_curve.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "refinement_curve.json"
    json_path.write_text(json.dumps({"train_depth": train_depth, "curve": list(curve)}, indent=1))
    return json_path, plot_refinement_curve(curve, out_dir / "refinement_curve.png", train_depth=train_depth)
