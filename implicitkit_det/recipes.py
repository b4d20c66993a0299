"""Command-line recipes: the settings of the digits demo, shared by the demo and the benchmarks.

A recipe is a list of options for :func:`implicitkit_det.cli.main` (the same words a user types), so what
a benchmark measures is what a user runs. Options given after a recipe override it.
"""

from __future__ import annotations

import itertools

from .data import DigitsDetectionConfig, build_digits_detection
from .models import CONFIGS, architecture_of
from .models.configs import parse_model_args
from .models.registry import unread_overrides
from .pretrain import PretrainConfig, pretrain_backbone

__all__ = ["DIGITS_DEMO", "digits_backbone", "digits_recipe"]

# The shapes every demo shares, sized for two CPU cores: 128-pixel inputs, 10 queries (a digits image has
# at most 6 objects), 16 sampling points per group (the paper has 64; 4 learn to localise far more slowly),
# 4 images per step. A short DEQ path: 6 no-grad refinement steps in training with RAG branches after
# steps 1, 3 and 6 (the published recipe: 20 steps, branches after 1, 3, 6, 9, 12, 20) and 6 steps at
# test. Every epoch is evaluated, for the AP-against-time curve.
# Each detector adds its row's DemoRecipe (learning rate, schedule, precision, model options).
DIGITS_DEMO: tuple[str, ...] = (
    "--model-arg", "num_queries=10", "--model-arg", "num_points=16",
    "--model-arg", "train_steps=6", "--model-arg", "supervise_steps=[1,3,6]", "--model-arg", "test_steps=6",
    "--image-size", "128", "--max-size", "192",
    "--batch-size", "4", "--warmup-iters", "50",
    "--workers", "0", "--eval-every", "1", "--print-freq", "50",
)  # fmt: skip


def digits_backbone(config: DigitsDetectionConfig | None = None) -> str:
    """The tiny detectors' ResNet-10 pre-trained on the digits set's *train* objects (built once, cached).

    The digits set's counterpart of the ImageNet weights the published detectors start from
    (:mod:`implicitkit_det.pretrain`); the val split is never read.
    """
    files = build_digits_detection(config)
    return str(pretrain_backbone(files.images("train"), files.annotations("train"), PretrainConfig()))


def digits_recipe(
    config: str = "deqdet_tiny", *, pretrained: bool = True, backbone: str | None = None
) -> list[str]:
    """The demo's options for `config` (any of the ``*_tiny`` detectors) on the bundled digits set.

    With `pretrained` the backbone starts from :func:`digits_backbone` (built on first use), where the run's
    backbone (`backbone`, default the config's) is the ResNet-10 it pre-trains; any other trains from scratch.
    """
    args = [
        "--config",
        config,
        *_read_by(config, DIGITS_DEMO),
        *architecture_of(CONFIGS[config].arch).demo.options(),
    ]
    if pretrained and (backbone or CONFIGS[config].backbone) == PretrainConfig().backbone:
        args += ["--model-arg", f"backbone_weights={digits_backbone()}"]
    return args


def _read_by(config: str, options: tuple[str, ...]) -> list[str]:
    """`options` without the ``--model-arg KEY=VALUE`` pairs that `config`'s architecture does not read (the
    shared DEQ schedule, for AdaMixer and Sparse R-CNN)."""
    pairs = [value for flag, value in itertools.pairwise(options) if flag == "--model-arg"]
    unread = set(unread_overrides(config, parse_model_args(pairs)))  # read as the command line reads them
    out: list[str] = []
    words = iter(options)
    for word in words:
        if word != "--model-arg":
            out.append(word)
        elif (pair := next(words)).split("=", 1)[0] not in unread:
            out += [word, pair]
    return out
