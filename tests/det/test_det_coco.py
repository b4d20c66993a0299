"""The COCO loader on a hand-written fixture (see conftest.py), and its answers to bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from implicitkit_det.data import CocoDetectionDataset, CocoFormatError, load_coco_json

GOOD_ANN = {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0}


def by_image_id(ds: CocoDetectionDataset) -> dict[int, tuple[torch.Tensor, dict]]:
    return {ds.ids[i]: ds[i] for i in range(len(ds))}


def test_loader_targets_match_the_file(coco_files):
    ds = CocoDetectionDataset(*coco_files)
    assert len(ds) == 3  # the image without annotations is kept
    # Category ids 3, 7, 12 become labels 0, 1, 2.
    assert ds.category_ids == [3, 7, 12]
    assert ds.label_to_category_id == [3, 7, 12]
    assert ds.category_names == ["cat", "dog", "bird"]
    assert ds.num_classes == 3

    samples = by_image_id(ds)
    image, t = samples[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 60, 80)
    # xywh -> xyxy; the crowd box (id 3) is left out; box 4 is clipped to the 80x60 image.
    expected = torch.tensor([[10.0, 5, 30, 35], [50, 20, 75, 50], [70, 40, 80, 60]])
    torch.testing.assert_close(t["boxes"], expected)
    torch.testing.assert_close(t["boxes_normalized"], expected / torch.tensor([80.0, 60, 80, 60]))
    assert t["labels"].tolist() == [1, 2, 0]
    assert t["labels"].dtype == torch.int64
    assert t["image_id"] == 1
    assert t["orig_size"].tolist() == [60, 80] and t["size"].tolist() == [60, 80]

    image, t = samples[2]
    assert image.shape == (3, 64, 64)
    assert t["boxes"].shape == (0, 4) and t["boxes_normalized"].shape == (0, 4) and t["labels"].shape == (0,)

    _, t = samples[3]
    torch.testing.assert_close(t["boxes"], torch.tensor([[5.0, 5, 15, 15]]))
    assert t["labels"].tolist() == [0]

    assert ds.skipped == {"degenerate": 0, "outside_image": 0, "crowd": 1}
    # The evaluation ground truth keeps the crowd region (COCO ignores detections on it).
    assert sorted(ds.coco.anns) == [1, 2, 3, 4, 5]


def test_boxes_cover_the_painted_pixels(coco_files):
    # The fixture paints each non-crowd box white on black: the loader's boxes must frame exactly those.
    ds = CocoDetectionDataset(*coco_files)
    image, t = by_image_id(ds)[1]
    painted = image[0] > 0
    frame = torch.zeros_like(painted)
    for x0, y0, x1, y1 in t["boxes"].long().tolist():
        frame[y0:y1, x0:x1] = True
    assert torch.equal(painted, frame)


def test_corrupt_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [{"id": 1,')
    with pytest.raises(CocoFormatError, match=r"broken\.json"):
        load_coco_json(bad)
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        CocoDetectionDataset(tmp_path, bad)


def test_missing_annotation_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        CocoDetectionDataset(tmp_path, tmp_path / "nowhere.json")


def test_file_without_images_list(tmp_path):
    f = tmp_path / "results.json"
    f.write_text("[]")
    with pytest.raises(CocoFormatError, match="results file"):
        load_coco_json(f)
    f.write_text('{"annotations": [], "categories": []}')
    with pytest.raises(CocoFormatError, match="'images'"):
        load_coco_json(f)


def test_unknown_category_names_annotation_and_category(make_coco):
    ann = {**GOOD_ANN, "id": 41, "category_id": 99}
    with pytest.raises(CocoFormatError, match=r"annotation id 41.*category id 99") as err:
        CocoDetectionDataset(*make_coco(annotations=[ann]))
    assert "instances.json" in str(err.value)


def test_annotation_of_unknown_image(make_coco):
    with pytest.raises(CocoFormatError, match=r"annotation id 8 refers to image id 77"):
        CocoDetectionDataset(*make_coco(annotations=[{**GOOD_ANN, "id": 8, "image_id": 77}]))


@pytest.mark.parametrize("image_id", ["img_a", "7", 2.0])
def test_an_image_id_that_is_not_an_integer_is_refused(make_coco, image_id):
    # "7" used to load as image 7 and then be "not in the ground truth" at evaluation; "img_a" failed in int().
    img_dir, ann_file = make_coco(annotations=[])
    entries = json.loads(ann_file.read_text())
    entries["images"][0]["id"] = image_id
    ann_file.write_text(json.dumps(entries))
    with pytest.raises(CocoFormatError, match=r"images\[0\] has id .*; COCO image ids are integers"):
        CocoDetectionDataset(img_dir, ann_file)


def test_duplicate_annotation_id(make_coco):
    with pytest.raises(CocoFormatError, match="annotation id 1 appears twice"):
        CocoDetectionDataset(*make_coco(annotations=[GOOD_ANN, {**GOOD_ANN, "image_id": 3}]))


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, "a", 4], [0, 0, float("nan"), 5]])
def test_malformed_bbox(make_coco, bbox):
    with pytest.raises(CocoFormatError, match=r"annotation id 1 \(image id 1\) has bbox"):
        CocoDetectionDataset(*make_coco(annotations=[{**GOOD_ANN, "bbox": bbox}]))


def test_missing_annotation_key(make_coco):
    ann = {k: v for k, v in GOOD_ANN.items() if k != "bbox"}
    with pytest.raises(CocoFormatError, match=r"annotations\[0\] lacks the key\(s\) \['bbox'\]"):
        CocoDetectionDataset(*make_coco(annotations=[ann]))


def test_negative_size_box_is_a_counted_logged_skip(make_coco, caplog):
    anns = [
        GOOD_ANN,
        {**GOOD_ANN, "id": 2, "bbox": [10, 10, -5, 8]},
        {**GOOD_ANN, "id": 3, "bbox": [10, 10, 6, 0]},
        {**GOOD_ANN, "id": 4, "image_id": 3, "bbox": [200, 200, 5, 5]},  # entirely outside the 50x70 image
    ]
    with caplog.at_level(logging.WARNING, logger="implicitkit_det.data.coco"):
        ds = CocoDetectionDataset(*make_coco(annotations=anns))
    assert ds.skipped == {"degenerate": 2, "outside_image": 1, "crowd": 0}
    messages = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "annotation id 2 (image id 1)" in messages
    assert "annotation id 3 (image id 1)" in messages
    assert "annotation id 4 (image id 3)" in messages and "outside" in messages
    assert "instances.json" in messages
    samples = by_image_id(ds)
    assert samples[1][1]["boxes"].shape == (1, 4)
    assert samples[3][1]["boxes"].shape == (0, 4)
    # The evaluation ground truth drops them too, so training and scoring see the same objects.
    assert sorted(ds.coco.anns) == [1]


def test_missing_image_names_id_and_path(make_coco):
    img_dir, ann_file = make_coco()
    (img_dir / "0002.png").unlink()
    ds = CocoDetectionDataset(img_dir, ann_file)
    with pytest.raises(FileNotFoundError, match=r"Image id 2 .*0002.png"):
        ds[ds.ids.index(2)]
    ds[ds.ids.index(1)]  # the others still load


def test_corrupt_image(make_coco):
    img_dir, ann_file = make_coco()
    (img_dir / "0003.png").write_bytes(b"not a png")
    ds = CocoDetectionDataset(img_dir, ann_file)
    with pytest.raises(CocoFormatError, match=r"Image id 3: cannot decode"):
        ds[ds.ids.index(3)]


def test_image_size_disagreeing_with_the_file(make_coco):
    img_dir, ann_file = make_coco(images={1: (80, 60), 2: (64, 64), 3: (50, 70)})
    from PIL import Image

    Image.new("RGB", (40, 30)).save(img_dir / "0001.png")
    ds = CocoDetectionDataset(img_dir, ann_file)
    with pytest.raises(CocoFormatError, match=r"Image id 1: .* is 40x30 but .* says 80x60"):
        ds[ds.ids.index(1)]


def test_annotation_ids_from_zero_are_numbered_from_one_for_the_evaluation(make_coco):
    """COCO's matching records a match by the ground truth's id and reads 0 as unmatched: perfect detections
    of annotations 0 and 1 scored AP 0.25 with both backends."""
    from implicitkit_det.evaluation import CocoEvaluator

    anns = [{**GOOD_ANN, "id": 0}, {**GOOD_ANN, "id": 1, "image_id": 2, "bbox": [4, 4, 30, 20]}]
    ds = CocoDetectionDataset(*make_coco(annotations=anns))
    assert sorted(ds.coco.anns) == [1, 2]
    for backend in ("pycocotools", "faster_coco_eval"):
        evaluator = CocoEvaluator(ds.coco, backend=backend)
        evaluator.update(
            [{"image_id": a["image_id"], "category_id": 7, "bbox": a["bbox"], "score": 1.0} for a in anns]
        )
        assert evaluator.summarize()["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("field", ["annotation", "category"])
def test_ids_that_are_not_integers_are_refused(make_coco, field):
    # A string category id loaded, then failed at the first evaluation with advice that did not apply.
    img_dir, ann_file = make_coco(annotations=[GOOD_ANN])
    entries = json.loads(ann_file.read_text())
    if field == "annotation":
        entries["annotations"][0]["id"] = "a1"
    else:
        entries["categories"] = [{**c, "id": str(c["id"])} for c in entries["categories"]]
        entries["annotations"][0]["category_id"] = "7"
    ann_file.write_text(json.dumps(entries))
    with pytest.raises(CocoFormatError, match=rf"has id .*\(str\); COCO {field} ids are integers"):
        CocoDetectionDataset(img_dir, ann_file)


@pytest.mark.parametrize("width", [80.4, True, "80"])
def test_an_image_size_that_is_not_whole_pixels_is_refused(make_coco, width):
    # 80.4 passed the image check (which compared int(width)) and then stopped the run at the first load.
    img_dir, ann_file = make_coco(annotations=[])
    entries = json.loads(ann_file.read_text())
    entries["images"][0]["width"] = width
    ann_file.write_text(json.dumps(entries))
    with pytest.raises(CocoFormatError, match="width and height must be positive integers"):
        CocoDetectionDataset(img_dir, ann_file)
    entries["images"][0]["width"] = 80.0  # a whole number written as a float is a size
    ann_file.write_text(json.dumps(entries))
    CocoDetectionDataset(img_dir, ann_file)[0]


def test_boxes_past_the_image_are_counted_and_warned_of(make_coco, caplog):
    anns = [
        GOOD_ANN,
        {**GOOD_ANN, "id": 2, "bbox": [-12, 5, 30, 20]},
        {**GOOD_ANN, "id": 3, "bbox": [70, 5, 10.5, 9]},
        {**GOOD_ANN, "id": 4, "bbox": [-20, 5, 30, 20], "iscrowd": 1},  # an ignore region: costs no AP
    ]
    with caplog.at_level(logging.WARNING, logger="implicitkit_det.data.coco"):
        ds = CocoDetectionDataset(*make_coco(annotations=anns))
    assert ds.clipped == 1  # 12 px past the left edge; half a pixel past the right one is rounding
    assert "1 boxes extend more than a pixel past their image" in caplog.text
    assert ds.coco.anns[2]["bbox"] == [-12, 5, 30, 20]  # scored as written, as COCO's own evaluation does


def test_a_16_bit_image_is_refused_not_read_white(make_coco):
    from PIL import Image

    from implicitkit_det.data.checks import DataError, check_images

    img_dir, ann_file = make_coco()
    Image.fromarray(np.full((60, 80), 3000, dtype=np.uint16)).save(img_dir / "0001.png")
    ds = CocoDetectionDataset(img_dir, ann_file)
    with pytest.raises(
        CocoFormatError, match=r"Image id 1: .*0001.png is in PIL mode I;16.*convert it to 8-bit"
    ):
        ds[ds.ids.index(1)]
    with pytest.raises(DataError, match=r"0001.png: is in PIL mode I;16"):
        check_images(ds, split="train", threads=1)


def test_a_size_swapped_by_exif_orientation_says_so(make_coco):
    from PIL import Image

    img_dir, ann_file = make_coco(images={1: (60, 80), 2: (64, 64), 3: (50, 70)})  # annotated 60 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 wide, shown turned by 90 degrees
    Image.new("RGB", (80, 60)).save(img_dir / "0001.png", exif=exif)
    ds = CocoDetectionDataset(img_dir, ann_file)
    with pytest.raises(CocoFormatError, match=r"EXIF orientation \(6\).*exif_transpose"):
        ds[ds.ids.index(1)]
