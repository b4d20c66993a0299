"""Train and evaluate DEQDet: the project's main demo.

With no dataset options this trains the CPU-sized ``deqdet_tiny`` on the bundled digits detection set
(built on first use from scikit-learn's handwritten digits) with settings chosen to finish in a few
minutes on two CPU cores, then prints the COCO table of the val split, saves the refinement curve
(``refinement_curve.png``) and val predictions beside ground truth (``predictions.png``):

    python examples/deqdet_coco.py

With a COCO-format dataset it is the command line of :mod:`implicitkit_det.cli`, unchanged:

    python examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco --batch-size 2
    torchrun --nproc_per_node=8 examples/deqdet_coco.py --config deqdet_r50_1x --data-root /data/coco

Any option given on the command line overrides the demo's (``--epochs 9`` trains longer, say, and the rate
still drops for the last epoch, as in the demo; a ``--model-arg backbone=`` other than the ResNet-10 the
demo pre-trains is trained from scratch; ``--help`` and COCO-format runs build nothing of the demo). With
``--config adamixer_tiny`` (or ``sparse_rcnn_tiny``, ``deq_sparse_rcnn_tiny``) the demo trains that
detector with its own recipe (the ``demo`` column of the detector table).
See docs/training.md.
"""

from __future__ import annotations

import argparse
import itertools
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
    if cli.names_data(argv) or {"-h", "--help"} & set(argv):
        return cli.main(argv)  # nothing of the demo is needed: build none of it
    config = demo_config(argv)
    folder = "outputs/" + config.removesuffix("_tiny") + "_digits_demo"
    start = time.perf_counter()
    recipe = digits_recipe(config, backbone=_model_arg(argv, "backbone"))
    if _given(argv, "--epochs") and not _given(argv, "--lr-drops"):
        recipe = _drops_kept_from_the_end(recipe, _value(argv, "--epochs"))
    stats = cli.main([*recipe, *DEMO_OUTPUTS, "--output-dir", folder, *argv])
    if stats:
        elapsed = time.perf_counter() - start
        print(f"digits val AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f}) in {elapsed:.0f}s")
    return stats


def _given(argv: list[str], flag: str) -> bool:
    return any(word == flag or word.startswith(flag + "=") for word in argv)


def _value(argv: list[str], flag: str) -> str:
    """The value of the last `flag` on the command line (``--flag VALUE`` or ``--flag=VALUE``)."""
    values = [b for a, b in itertools.pairwise(argv) if a == flag]
    values += [w.split("=", 1)[1] for w in argv if w.startswith(flag + "=")]
    return values[-1]


def _drops_kept_from_the_end(recipe: list[str], epochs: str) -> list[str]:
    """The recipe with `epochs` and its rate drops as many epochs before the end as the recipe's were (the
    demos drop before their last epoch), so ``--epochs 9`` trains longer and still drops for the last one."""
    i, j = recipe.index("--epochs"), recipe.index("--lr-drops")
    shift = int(epochs) - int(recipe[i + 1]) if epochs.isdigit() else 0  # the command line refuses a bad one
    drops = [int(d) + shift for d in recipe[j + 1].split(",")]
    kept = ",".join(str(d) for d in drops if d >= 1)
    return recipe[:j] + (["--lr-drops", kept] if kept else []) + recipe[j + 2 :]


def _model_arg(argv: list[str], key: str) -> str | None:
    """The value of the last ``--model-arg key=VALUE`` on the command line, if any."""
    pairs = itertools.pairwise(argv)
    values = [b.split("=", 1)[1] for a, b in pairs if a == "--model-arg" and b.startswith(key + "=")]
    return values[-1] if values else None


if __name__ == "__main__":
    main()
