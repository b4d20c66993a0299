"""Train and evaluate DEQDet: the project's main demo.

With no dataset options this trains the CPU-sized ``deqdet_tiny`` on the bundled digits detection set
(built on first use from scikit-learn's handwritten digits) with settings chosen to finish in a few
minutes on two CPU cores, then prints the COCO table of the val split, saves the refinement curve
(``refinement_curve.png``) and val predictions beside ground truth (``predictions.png``):

    python examples/deqdet_coco.py

With a COCO-format dataset it is the command line of :mod:`implicitkit_det.cli`, unchanged:

    python examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco --batch-size 2
    torchrun --nproc_per_node=8 examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco

Any option given on the command line overrides the demo's (``--epochs 6`` trains longer, say).
See docs/training.md.
"""

from __future__ import annotations

import sys
import time

from implicitkit_det import cli

# The demo, sized for two CPU cores: 128-pixel inputs, 10 queries (a digits image has at most 6 objects),
# 4 images per step, three epochs of the 1000 training images (750 steps) with the learning rate dropped
# for the last one, and a learning rate suited to a backbone trained from scratch. The DEQ path is
# shortened: 6 no-grad refinement steps in training with RAG branches after steps 1, 3 and 6 (the published
# recipe: 20 steps, branches after 1, 3, 6, 9, 12, 20), and 6 refinement steps at test. At the end it
# scores the refinement curve (AP after 0..12 test-time steps, twice the training depth) and draws 8 val
# images, ground truth beside predictions, into the output folder.
DEMO_ARGS = [
    "--config", "deqdet_tiny",
    "--model-arg", "num_queries=10", "--model-arg", "train_steps=6", "--model-arg", "supervise_steps=[1,3,6]",
    "--model-arg", "test_steps=6",
    "--image-size", "128", "--max-size", "192",
    "--batch-size", "4", "--epochs", "3", "--lr-drops", "2", "--lr", "2e-4", "--warmup-iters", "50",
    "--workers", "0", "--eval-every", "3", "--print-freq", "50",
    "--refinement-curve", "12", "--save-predictions", "8",
    "--output-dir", "outputs/deqdet_digits_demo",
]  # fmt: skip
DATA_OPTIONS = ("--data-root", "--train-ann", "--val-ann", "--train-images", "--val-images")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    on_digits = not any(a.split("=")[0] in DATA_OPTIONS for a in argv)
    start = time.perf_counter()
    stats = cli.main([*DEMO_ARGS, *argv] if on_digits else argv)
    if on_digits and stats:
        elapsed = time.perf_counter() - start
        print(f"digits val AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f}) in {elapsed:.0f}s")
    return stats


if __name__ == "__main__":
    main()
