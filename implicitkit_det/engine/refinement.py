"""The refinement curve: a detector's AP after 0, 1, ..., N refinement steps at test, in one pass."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import DetectionBatch
from ..evaluation import CocoEvaluator, to_coco_results
from ..models.detector import QueryDetector
from .evaluate import rescale_to_original
from .process_group import broadcast_buffers, unwrap
from .train import autocast

__all__ = [
    "plot_refinement_curve",
    "refinement_curve",
    "refinement_layers",
    "save_refinement_curve",
    "training_depth",
]


def refinement_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The layers a detector (plain or in DDP) applies at test, one per refinement step, without end:
    :meth:`~implicitkit_det.models.QueryDetector.refinement_layers`. A DEQ detector: ``G``, then ``F`` again
    and again; a stack of stages: its stages in order, then its last stage again."""
    model = unwrap(model)
    if not isinstance(model, QueryDetector):
        raise TypeError(
            f"the refinement curve needs a QueryDetector: a DEQ detector (init layer G, refinement layer F) or "
            f"a stack of decoder stages (AdaMixer, Sparse R-CNN); got {type(model).__name__}"
        )
    return model.refinement_layers()


def training_depth(model: nn.Module) -> int | None:
    """The step of :func:`refinement_layers` a detector was trained to (a DEQ's no-grad training steps, a
    stack's last stage); None when the model says neither."""
    model = unwrap(model)
    return model.training_depth if isinstance(model, QueryDetector) else None


@torch.no_grad()
def refinement_curve(
    model: nn.Module,
    loader: Iterable[DetectionBatch],
    coco_gt: Any,
    *,
    max_steps: int,
    device: torch.device,
    label_to_category_id: Sequence[int] | None = None,
    amp: bool = False,
) -> list[dict[str, float]]:
    """COCO AP of ``y_n = L_n(... L_1(L_0(q_0)))`` for ``n = 0 .. max_steps``: the refinement-awareness figure.

    ``L_n`` are :func:`refinement_layers`: for a DEQ detector ``y_n = F^n(G(q_0))``; for an explicit stack
    ``y_n`` is stage ``n``'s output, and past the last stage that stage applied again. Each batch goes
    through the backbone and ``max_steps + 1`` layers once; the prediction after every layer is scored by
    its own evaluator, so the whole curve costs one evaluation at ``max_steps``.

    Arguments:
        model: the detector, plain or in DDP.
        loader: yields evaluation batches with ``image_id``, ``size`` and ``orig_size`` in the targets.
        coco_gt: the ground truth (``dataset.coco``).
        max_steps: the last step scored; beyond the training depth shows whether AP holds.
        label_to_category_id: the dataset's map from labels to category ids.
        amp: under :func:`~implicitkit_det.engine.train.autocast`, as the evaluation of an ``--amp`` run.

    Returns:
        One dict per step: ``steps``, ``AP``, ``AP50``, ``AP75``.
    """
    model = unwrap(model).eval()
    refinement_layers(model)  # the model's kind is checked before any work
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    broadcast_buffers(model)  # every process scores with rank 0's normalisation statistics
    evaluators = [CocoEvaluator(coco_gt) for _ in range(max_steps + 1)]
    for batch in loader:
        batch = batch.to(device)
        ids = [t["image_id"] for t in batch.targets]
        # The precision of the model's own forward (evaluate's): its backbone under autocast, its decoder
        # as decoding() sets it.
        with autocast(device, amp):
            sizes = model.image_sizes(batch.images, mask=batch.mask)
            with model.decoding(batch.images, sizes) as features:
                state = model.queries(sizes)
                for evaluator, layer in zip(evaluators, refinement_layers(model)):
                    state = layer(state, features, sizes)
                    outputs = layer.predict(state, sizes)
                    detections = rescale_to_original(model.postprocess(outputs, sizes), batch.targets)
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
