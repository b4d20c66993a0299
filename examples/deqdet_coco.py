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

import sys
import time

from implicitkit_det import cli
from implicitkit_det.models import CONFIGS
from implicitkit_det.models.configs import parse_model_args
from implicitkit_det.recipes import digits_recipe

# After training: the refinement curve up to twice the training depth, and 8 val images drawn.
DEMO_OUTPUTS = ["--refinement-curve", "12", "--save-predictions", "8"]


def demo_config(argv: list[str]) -> str:
    """The ``--config`` a command line names (the demo's ``deqdet_tiny`` when none): its recipe is used."""
    return _config_of(_read(argv)[0])


def _config_of(options: dict) -> str:
    config = options.get("config") or "deqdet_tiny"
    return config if config in CONFIGS else "deqdet_tiny"  # the command line then refuses an unknown name


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if cli.names_data(argv) or {"-h", "--help"} & set(argv):
        return cli.main(argv)  # nothing of the demo is needed: build none of it
    command, rest = (argv[:1], argv[1:]) if argv[:1] and argv[0] in cli.COMMANDS else ([], argv)
    options, given = _read(rest)
    config = _config_of(options)
    folder = "outputs/" + config.removesuffix("_tiny") + "_digits_demo"
    start = time.perf_counter()
    backbone = parse_model_args(options.get("model_arg") or []).get("backbone")
    recipe = digits_recipe(config, backbone=backbone)
    if "epochs" in given and "drops" not in given and "lr_drops" not in given:
        recipe = _drops_kept_from_the_end(recipe, options["epochs"])
    stats = cli.main([*command, *recipe, *DEMO_OUTPUTS, "--output-dir", folder, *rest])
    if stats:
        elapsed = time.perf_counter() - start
        print(f"digits val AP {stats['AP']:.3f} (AP50 {stats['AP50']:.3f}) in {elapsed:.0f}s")
    return stats


def _read(argv: list[str]) -> tuple[dict, set[str]]:
    """The options a command line gives, read by the command line's own parser (abbreviations, ``=``
    forms and repeats as it reads them), and their names; ``{}`` where it cannot read them (the run then
    says why)."""
    parser = cli.build_parser()
    try:
        return vars(parser.parse_known_args(argv)[0]), cli.given_options(parser, argv)
    except SystemExit:
        return {}, set()


def _drops_kept_from_the_end(recipe: list[str], epochs: int) -> list[str]:
    """The recipe's rate drops as many epochs before the end as they were (the demos drop before their last
    epoch), so ``--epochs 9`` trains longer and still drops for the last one."""
    i, j = recipe.index("--epochs"), recipe.index("--lr-drops")
    shift = int(epochs) - int(recipe[i + 1])
    drops = [int(d) + shift for d in recipe[j + 1].split(",") if d.strip()]
    return [*recipe[: j + 1], ",".join(str(d) for d in drops if d >= 1), *recipe[j + 2 :]]


if __name__ == "__main__":
    main()
