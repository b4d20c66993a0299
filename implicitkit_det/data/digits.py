"""The bundled detection set: real handwritten digits pasted on cluttered canvases, in COCO format.

The glyphs are the 1797 8x8 handwritten digits of the UCI set shipped with scikit-learn
(``sklearn.datasets.load_digits``), ten classes. The glyph indices are partitioned per class into a train
and a val pool first, so the two splits never share a glyph. Each image is then drawn from its own random
stream ``numpy.random.default_rng([seed, split, index])``:

- a canvas of random size with a two-colour gradient background, light or dark;
- clutter that is not a digit: thin strokes, faint blobs and speckle patches, some in the glyphs' colour;
- 1 to 6 glyphs, upscaled (bilinear or nearest) to sides drawn log-uniformly in ``glyph_size`` with a small
  aspect jitter, in a colour that contrasts with the background. About a third are placed flush against an
  earlier glyph (touching); otherwise glyph boxes overlap by at most 10% of the smaller one;
- Gaussian pixel noise.

Boxes are the tight boxes of each glyph's ink. The set is written once, as PNG images plus
``annotations/instances_{train,val}.json`` (categories 0..9 named "0".."9"; every annotation also records
its ``glyph_index`` into ``load_digits``), into a cache folder whose name carries a fingerprint of the
format version and of every parameter, so changing a parameter builds a new set and the same parameters
reuse (and reproduce, byte for byte) the same files. The folder is assembled under a temporary name and
renamed into place, so concurrent builders never see a half-written set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .coco import CocoDetectionDataset

__all__ = [
    "DigitsDetectionConfig",
    "DigitsDetectionFiles",
    "build_digits_detection",
    "default_cache_dir",
    "digits_detection_dataset",
]

logger = logging.getLogger(__name__)

#: Bump when the rendering changes, so existing caches are not reused for different data.
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CACHE_ENV = "IMPLICITKIT_CACHE"


@dataclass(frozen=True)
class DigitsDetectionConfig:
    """Every parameter of the bundled set; all of them enter the cache fingerprint.

    Attributes:
        seed: the one seed everything is drawn from.
        num_train, num_val: images per split.
        image_size: (min, max) of each canvas side, drawn independently for height and width.
        objects_per_image: (min, max) glyphs per image (fewer if a crowded canvas has no room left).
        glyph_size: (min, max) glyph side in pixels, drawn log-uniformly so small glyphs are common.
        val_fraction: share of each class's glyphs reserved for the val split.
        clutter_per_image: (min, max) clutter items per image.
        noise_std: standard deviation of the pixel noise, in 0..255 units.
    """

    seed: int = 0
    num_train: int = 1000
    num_val: int = 200
    image_size: tuple[int, int] = (128, 192)
    objects_per_image: tuple[int, int] = (1, 6)
    glyph_size: tuple[int, int] = (12, 64)
    val_fraction: float = 0.2
    clutter_per_image: tuple[int, int] = (2, 8)
    noise_std: float = 6.0

    def __post_init__(self) -> None:
        for name in ("image_size", "objects_per_image", "glyph_size", "clutter_per_image"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        if self.glyph_size[0] < 4 or self.glyph_size[1] > self.image_size[0]:
            raise ValueError(
                f"glyph_size {self.glyph_size} must lie within [4, smallest image side {self.image_size[0]}]"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def fingerprint(self) -> str:
        """A short hash of the format version and every parameter."""
        payload = json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DigitsDetectionFiles:
    """Where a built set lives: ``root/{train,val}/*.png`` and ``root/annotations/instances_*.json``."""

    root: Path

    def images(self, split: str) -> Path:
        """The image folder of `split` (the ``root`` of a COCO dataset)."""
        return self.root / _check_split(split)

    def annotations(self, split: str) -> Path:
        """The COCO annotation file of `split`."""
        return self.root / "annotations" / f"instances_{_check_split(split)}.json"


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def default_cache_dir() -> Path:
    """``$IMPLICITKIT_CACHE/digits_det`` when that variable is set, else ``~/.cache/implicitkit/digits_det``."""
    base = os.environ.get(_CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "implicitkit") / "digits_det"


def build_digits_detection(
    config: DigitsDetectionConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> DigitsDetectionFiles:
    """Build the bundled set once (or find it already built) and return where its files are.

    Arguments:
        config: the set's parameters; the defaults give 1000 train / 200 val images of 128-192 px.
        cache_dir: the folder holding built sets; default :func:`default_cache_dir`.

    Returns:
        The :class:`DigitsDetectionFiles` of ``cache_dir/v{version}-seed{seed}-{fingerprint}``.
    """
    config = config or DigitsDetectionConfig()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"v{FORMAT_VERSION}-seed{config.seed}-{config.fingerprint()}"
    # The manifest is written before the folder is renamed into place, so its presence means "complete".
    if (final / "manifest.json").is_file():
        return DigitsDetectionFiles(final)

    cache.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(cache)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        logger.info("building the digits detection set in %s", final)
        _write_dataset(tmp, config)
        try:
            os.rename(tmp, final)
        except OSError as err:
            # Another process finished first; its files are identical, keep them.
            if not (final / "manifest.json").is_file():
                raise RuntimeError(
                    f"{final} exists but has no manifest.json (it was changed by hand?); delete it and retry."
                ) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DigitsDetectionFiles(final)


def _remove_abandoned_builds(cache: Path, older_than_s: float = 3600.0) -> None:
    """Delete the temporary folders of builds killed part-way (a build takes seconds, not an hour)."""
    now = time.time()
    for folder in cache.glob(".building-*"):
        with contextlib.suppress(OSError):
            # A live build writes into its split folders, whose times move while the top folder's does not.
            touched = max(p.stat().st_mtime for p in [folder, *folder.iterdir()] if p.is_dir())
            if now - touched > older_than_s:
                shutil.rmtree(folder, ignore_errors=True)


def digits_detection_dataset(
    split: str,
    *,
    transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    config: DigitsDetectionConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> CocoDetectionDataset:
    """The `split` ("train" or "val") of the bundled set as a :class:`CocoDetectionDataset` (built if needed)."""
    files = build_digits_detection(config, cache_dir)
    return CocoDetectionDataset(files.images(split), files.annotations(split), transforms=transforms)


# --------------------------------------------------------------------------------------------------------
# Building.
def _load_glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def split_glyphs(labels: np.ndarray, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Partition glyph indices into disjoint, per-class stratified ``{"train", "val"}`` pools."""
    rng = np.random.default_rng([seed, 2**16])
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _write_dataset(root: Path, config: DigitsDetectionConfig) -> None:
    glyphs, labels = _load_glyphs()
    pools = split_glyphs(labels, config.seed, config.val_fraction)
    (root / "annotations").mkdir()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fingerprint": config.fingerprint(),
        "config": dataclasses.asdict(config),
        "source": "sklearn.datasets.load_digits",
        "splits": {},
    }
    counts = {"train": config.num_train, "val": config.num_val}
    for split_code, split in enumerate(SPLITS):
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(counts[split]):
            rng = np.random.default_rng([config.seed, split_code, i])
            pixels, objects = _render_image(rng, config, glyphs, labels, pools[split])
            file_name = f"{i:06d}.png"
            Image.fromarray(pixels).save(root / split / file_name, format="PNG")
            image_id = i + 1
            images.append(
                {"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]}
            )
            for x0, y0, x1, y1, label, glyph in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,  # COCO tools treat id 0 as "unmatched"
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": (x1 - x0) * (y1 - y0),
                        "iscrowd": 0,
                        "glyph_index": glyph,
                    }
                )
        coco = {
            "info": {
                "description": f"implicitkit digits detection set, {split} split",
                "version": FORMAT_VERSION,
            },
            "images": images,
            "annotations": annotations,
            "categories": [{"id": c, "name": str(c), "supercategory": "digit"} for c in range(10)],
        }
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco, f, separators=(",", ":"))
        manifest["splits"][split] = {
            "images": len(images),
            "annotations": len(annotations),
            "glyph_pool": [int(g) for g in pools[split]],
        }
    with open(root / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)


def _render_image(
    rng: np.random.Generator,
    config: DigitsDetectionConfig,
    glyphs: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int, int]]]:
    """Draw one canvas; return ``(H x W x 3 uint8, [(x0, y0, x1, y1, label, glyph_index), ...])``."""
    h, w = (int(v) for v in rng.integers(config.image_size[0], config.image_size[1] + 1, size=2))
    dark = bool(rng.random() < 0.5)
    # Background and ink live in opposite halves of the range, so a glyph always contrasts with the canvas.
    bg_lo, bg_hi, ink_lo, ink_hi = (0, 110, 160, 256) if dark else (150, 256, 0, 100)
    canvas = _gradient(rng, h, w, rng.integers(bg_lo, bg_hi, size=3), rng.integers(bg_lo, bg_hi, size=3))
    ink = rng.integers(ink_lo, ink_hi, size=3).astype(np.float32)

    for _ in range(int(rng.integers(config.clutter_per_image[0], config.clutter_per_image[1] + 1))):
        _draw_clutter(rng, canvas, ink, bg_lo, bg_hi)

    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(config.objects_per_image[0], config.objects_per_image[1] + 1))):
        glyph = int(rng.choice(pool))
        alpha = _scaled_glyph(rng, glyphs[glyph], config.glyph_size, max_side=min(h, w) - 2)
        placed = _place(rng, alpha, boxes, h, w)
        if placed is None:  # no room left on this canvas
            continue
        px, py, box = placed
        colour = np.clip(ink + rng.normal(0.0, 12.0, size=3), 0, 255).astype(np.float32)
        region = canvas[py : py + alpha.shape[0], px : px + alpha.shape[1]]
        region += alpha[..., None] * (colour - region)
        boxes.append(box)
        objects.append((*box, int(labels[glyph]), glyph))

    canvas += rng.normal(0.0, config.noise_std, size=canvas.shape).astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


def _gradient(rng: np.random.Generator, h: int, w: int, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    t = (
        np.float32(np.cos(angle) / w) * np.arange(w, dtype=np.float32)[None, :]
        + np.float32(np.sin(angle) / h) * np.arange(h, dtype=np.float32)[:, None]
    )
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = c0.astype(np.float32), c1.astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)


def _draw_clutter(
    rng: np.random.Generator, canvas: np.ndarray, ink: np.ndarray, bg_lo: int, bg_hi: int
) -> None:
    """Blend one non-digit item (stroke, blob or speckle patch) into `canvas` in place."""
    h, w = canvas.shape[:2]
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    kind = int(rng.integers(3))
    if kind == 0:  # a thin straight or bent stroke
        pts = [(float(rng.uniform(0, w)), float(rng.uniform(0, h))) for _ in range(int(rng.integers(2, 4)))]
        draw.line(pts, fill=255, width=int(rng.integers(1, 3)))
        strength = rng.uniform(0.4, 0.9)
    elif kind == 1:  # a faint blob
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(4, w / 4), rng.uniform(4, h / 4)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        strength = rng.uniform(0.15, 0.4)
    else:  # a patch of speckles
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 20)
        for _ in range(int(rng.integers(10, 40))):
            x, y = cx + rng.normal(0, r), cy + rng.normal(0, r)
            draw.point((float(x), float(y)), fill=255)
        strength = rng.uniform(0.5, 1.0)
    # Half of the clutter is in the glyphs' own colour, so colour alone does not give the digits away.
    colour = ink if rng.random() < 0.5 else rng.integers(bg_lo, bg_hi, size=3).astype(np.float32)
    bbox = mask.getbbox()
    if bbox is None:  # drawn entirely off the canvas
        return
    x0, y0, x1, y1 = bbox
    a = np.asarray(mask.crop(bbox), dtype=np.float32)[..., None] * np.float32(strength / 255.0)
    region = canvas[y0:y1, x0:x1]
    region += a * (colour - region)


def _scaled_glyph(
    rng: np.random.Generator, glyph: np.ndarray, glyph_size: tuple[int, int], max_side: int
) -> np.ndarray:
    """Upscale an 8x8 glyph in [0, 1] to a side log-uniform in `glyph_size` with an aspect jitter."""
    lo, hi = np.log(glyph_size[0]), np.log(min(glyph_size[1], max_side))
    side = float(np.exp(rng.uniform(lo, max(lo, hi))))
    aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
    gh = int(np.clip(round(side * aspect), 4, max_side))
    gw = int(np.clip(round(side / aspect), 4, max_side))
    resample = Image.Resampling.BILINEAR if rng.random() < 0.75 else Image.Resampling.NEAREST
    alpha = np.asarray(Image.fromarray(glyph).resize((gw, gh), resample=resample), dtype=np.float32)
    return np.clip(alpha, 0.0, 1.0)


def _place(
    rng: np.random.Generator,
    alpha: np.ndarray,
    boxes: list[tuple[int, int, int, int]],
    h: int,
    w: int,
    tries: int = 30,
) -> tuple[int, int, tuple[int, int, int, int]] | None:
    """Find where to paste a glyph: ``(left, top, ink box)``, or None when no try fits.

    The ink box is where ``alpha > 0.2``. With probability 0.35 (when another glyph exists) the glyph is put
    flush against one, otherwise anywhere; a position is kept if the ink box lies inside the canvas and
    overlaps each earlier box by at most 10% of the smaller of the two.
    """
    rows = np.flatnonzero((alpha > 0.2).any(axis=1))
    cols = np.flatnonzero((alpha > 0.2).any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    gh, gw = alpha.shape
    for _ in range(tries):
        if boxes and rng.random() < 0.35:
            bx0, by0, bx1, by1 = boxes[int(rng.integers(len(boxes)))]
            side = int(rng.integers(4))
            if side in (0, 1):  # to the right of / to the left of the neighbour
                px = bx1 - c0 if side == 0 else bx0 - c1
                py = int(rng.integers(by0 - r1 + 1, by1 - r0)) if by1 - r0 > by0 - r1 + 1 else by0 - r0
            else:  # below / above
                py = by1 - r0 if side == 2 else by0 - r1
                px = int(rng.integers(bx0 - c1 + 1, bx1 - c0)) if bx1 - c0 > bx0 - c1 + 1 else bx0 - c0
        else:
            px, py = int(rng.integers(0, w - gw + 1)), int(rng.integers(0, h - gh + 1))
        if px < 0 or py < 0 or px + gw > w or py + gh > h:
            continue
        box = (px + c0, py + r0, px + c1, py + r1)
        if all(_overlap_fraction(box, b) <= 0.1 for b in boxes):
            return px, py, box
    return None


def _overlap_fraction(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection area over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller
