"""Checks of a detection dataset made before training starts, so that bad data fails in seconds, not hours.

:func:`check_splits` refuses splits a run cannot use (no images, no categories, no image with a box to
train on); :func:`check_images` opens and decodes every image a split refers to and compares its size with
the annotation file's. Both raise :class:`DataError` with a message naming the file and the fix.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ..collectives import all_gather_object, get_rank, get_world_size, is_main_process
from .coco import CocoDetectionDataset
from .images import orientation_note, unreadable_mode

__all__ = ["DataError", "check_images", "check_splits"]

_SHOWN = 10


class DataError(ValueError):
    """A dataset the run cannot train or evaluate on; the message names the file and the fix."""


def check_splits(train: CocoDetectionDataset | None, val: CocoDetectionDataset) -> None:
    """Refuse an empty validation file or one without boxes, a file without categories, and a training set
    with nothing to learn.

    Raises:
        :class:`DataError`.
    """
    for split, data in (("validation", val), ("training", train)):
        if data is None:
            continue
        if not data.category_ids:
            raise DataError(
                f"{data.ann_file} lists no categories: the {split} annotation file needs its 'categories' "
                "(id and name of every class); fix the file or point at the right one"
            )
    if len(val) == 0:
        raise DataError(
            f"{val.ann_file} lists no images: there is nothing to evaluate on. Point --val-ann (or --data-root) "
            "at the validation annotations"
        )
    if train is not None and len(train) == 0:
        total = train.removed_empty
        why = (
            f"its {total} images have no usable box, so none is left to train on (add annotations, or pass "
            "--keep-empty-images to train on images without boxes)"
            if total
            else "it lists no images (point --train-ann, or --data-root, at the training annotations)"
        )
        raise DataError(f"{train.ann_file}: {why}")
    if val.num_boxes == 0:
        raise DataError(
            f"{val.ann_file} has no usable box (crowd regions aside) on any of its {len(val)} images, so every "
            "AP would be undefined (an image-info file such as COCO's test-dev has none). Point --val-ann (or "
            "--data-root) at annotated validation data"
        )


def _check_one(path: Path, width: int, height: int) -> str | None:
    if not path.is_file():
        return f"{path}: missing"
    try:
        with Image.open(path) as image:
            size = image.size
            image.load()  # decodes the whole file: a truncated image fails here
            why = unreadable_mode(image)
            note = orientation_note(image, width, height) if size != (width, height) else ""
    except Exception as err:
        return f"{path}: cannot be decoded ({type(err).__name__}: {err})"
    if why is not None:
        return f"{path}: {why}"
    if size != (width, height):
        return f"{path}: is {size[0]}x{size[1]} pixels, the annotation file says {width}x{height}.{note}"
    return None


def check_images(dataset: CocoDetectionDataset, *, split: str, threads: int = 4) -> None:
    """Open and decode every image of `dataset`, and compare its size with the annotation file's.

    Under several processes each checks its share and all learn every problem (all stop together). A
    progress bar runs on rank 0.

    Raises:
        :class:`DataError` listing the bad images (the first ten), naming the annotation file.
    """
    entries = [dataset.image_entry(i) for i in dataset.ids][get_rank() :: get_world_size()]
    root = Path(dataset.root)
    jobs = [(root / e["file_name"], int(e["width"]), int(e["height"])) for e in entries]
    bar = tqdm(
        total=len(dataset.ids),
        desc=f"checking {split} images",
        unit="img",
        disable=not is_main_process(),
        mininterval=2.0,
        dynamic_ncols=True,
    )
    problems: list[str] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for problem in pool.map(lambda job: _check_one(*job), jobs):
            bar.update(min(get_world_size(), len(dataset.ids) - bar.n))
            if problem is not None:
                problems.append(problem)
    bar.close()
    problems = sorted(p for share in all_gather_object(problems) for p in share)
    if dataset.ids and sum(p.endswith(": missing") for p in problems) == len(dataset.ids):
        raise DataError(
            f"none of the {len(dataset.ids)} {split} images listed in {dataset.ann_file} is in {root} (the first "
            f"looked for: {problems[0].removesuffix(': missing')}): the image folder does not belong to this "
            f"annotation file. Point the {split} image folder (--{'train' if split == 'training' else 'val'}-images) "
            "at the folder that holds its images."
        )
    if problems:
        shown = "\n  ".join(problems[:_SHOWN])
        more = f"\n  ... and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise DataError(
            f"{len(problems)} of the {len(dataset.ids)} {split} images listed in {dataset.ann_file} cannot be "
            f"used:\n  {shown}{more}\nFix or remove these entries (or the files). To train on trusted data "
            "without this check, pass --skip-image-check (a bad image then stops the run when it is loaded)."
        )
