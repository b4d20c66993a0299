"""Train and evaluate DEQDet: the project's main demo.

With no dataset options this trains the CPU-sized ``deqdet_tiny`` on the bundled digits detection set
(built on first use from scikit-learn's handwritten digits) with settings chosen to finish in a few
minutes on two CPU cores, then prints the COCO table of the val split, saves the refinement curve
(``refinement_curve.png``) and val predictions beside ground truth (``predictions.png``):

    python examples/deqdet_coco.py

With a COCO-format dataset it is the command line of :mod:`implicitkit_det.cli`, unchanged:

    python examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco --batch-size 2
    torchrun --nproc_per_node=8 examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco

Any option given on the command line overrides the demo's (``--epochs 9`` trains longer, say). With
``--config adamixer_tiny`` (or ``sparse_rcnn_tiny``, ``deq_sparse_rcnn_tiny``) the demo trains that
detector with its own recipe (the ``demo`` column of the detector table).
See docs/training.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from implicitkit_det import cli
from implicitkit_det.models import CONFIGS
from implicitkit_det.recipes import digits_recipe

# After training: the refinement curve up to twice the training depth, and 8 val images drawn.
DEMO_OUTPUTS = ["--refinement-curve", "12", "--save-predictions", "8"]


def demo_config(argv: list[str]) -> str:
    """The ``--config`` a command line names (the demo's ``deqdet_tiny`` when none): its recipe is used."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", default="deqdet_tiny")
    config = parser.parse_known_args(argv)[0].config
    return config if config in CONFIGS else "deqdet_tiny"  # the command line then refuses an unknown name


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    on_digits = not cli.names_data(argv)
    config = demo_config(argv)
    folder = "outputs/" + config.removesuffix("_tiny") + "_digits_demo"
    start = time.perf_counter()
    demo = [*digits_recipe(config), *DEMO_OUTPUTS, "--output-dir", folder]
    stats = cli.main([*demo, *argv] if on_digits else argv)
    if on_digits and stats:
        elapsed = time.perf_counter() - start
        print(f"digits val AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f}) in {elapsed:.0f}s")
    return stats


if __name__ == "__main__":
    main()
