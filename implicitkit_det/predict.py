"""``python -m implicitkit_det.predict CHECKPOINT IMAGE_OR_FOLDER ... --out DIR``: draw a model's detections.

Writes one PNG per image with boxes, labels and scores drawn (torchvision's ``draw_bounding_boxes``) and
prints what it found. The Python entry point is :func:`implicitkit_det.engine.predict.predict_files`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .engine.predict import predict_files


def main(argv: Sequence[str] | None = None, prog: str = "python -m implicitkit_det.predict") -> list[dict]:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", type=Path, help="a training run's folder, or one of its checkpoint_*.pth files"
    )
    parser.add_argument("inputs", type=Path, nargs="+", help="image files, or folders of them")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("predictions"),
        help="folder for the drawn PNGs (default: predictions)",
    )
    parser.add_argument(
        "--score", type=float, default=0.3, help="draw detections scoring at least this (default: 0.3)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--deq-steps", type=int, default=None, help="a DEQ detector's refinement steps (default: the run's)"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.score <= 1.0:
        parser.error(f"--score must lie in [0, 1], got {args.score}")
    try:
        results = predict_files(
            args.checkpoint,
            args.inputs,
            args.out,
            score_threshold=args.score,
            device=args.device,
            test_steps=args.deq_steps,
        )
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    for r in results:
        print(f"{r['image']}: {len(r['detections']['boxes'])} detections -> {r['output']}")
    return results


if __name__ == "__main__":
    main()
