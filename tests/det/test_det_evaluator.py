"""COCO evaluator: known predictions give known AP, both backends agree, empty and duplicate input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from implicitkit_det.data import CocoDetectionDataset, make_eval_transforms
from implicitkit_det.evaluation import STAT_NAMES, CocoEvaluator, PostProcess, format_summary, to_coco_results

BACKENDS = ["faster_coco_eval", "pycocotools"]

# Three 200x200 images; one object per (image, category), so AR@1 can reach 1. Sizes cover the small
# (< 32^2), medium and large (> 96^2) area ranges. Image 4 has no objects; annotation 7 is a crowd region.
GT = {
    "images": [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in (1, 2, 3, 4)],
    "categories": [{"id": 5, "name": "square"}, {"id": 9, "name": "slab"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [60, 60, 100, 120]},
        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [100, 20, 40, 40]},
        {"id": 4, "image_id": 2, "category_id": 9, "bbox": [10, 90, 180, 100]},
        {"id": 5, "image_id": 3, "category_id": 5, "bbox": [5, 150, 24, 16]},
        {"id": 6, "image_id": 3, "category_id": 9, "bbox": [50, 10, 60, 50]},
        {"id": 7, "image_id": 3, "category_id": 9, "bbox": [120, 120, 60, 60], "iscrowd": 1},
    ],
}
for _a in GT["annotations"]:
    _a.setdefault("iscrowd", 0)
    _a["area"] = _a["bbox"][2] * _a["bbox"][3]


def perfect(score: float = 0.9) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
        for a in GT["annotations"]
        if not a["iscrowd"]
    ]


def shifted() -> list[dict]:
    # Shift each box right by 0.225 of its width: IoU = 0.775 / 1.225 = 0.633, matched at the IoU
    # thresholds 0.50, 0.55, 0.60 and missed at the 7 others.
    out = perfect()
    for r in out:
        r["bbox"][0] += 0.225 * r["bbox"][2]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_perfect_predictions_score_one(backend, capsys):
    ev = CocoEvaluator(GT, backend=backend)
    ev.update(perfect())
    s = ev.summarize()
    assert [s[k] for k in STAT_NAMES] == pytest.approx([1.0] * 12)
    assert s["per_class_AP"] == pytest.approx({"square": 1.0, "slab": 1.0})
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in printed
    assert "square" in printed and "slab" in printed


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_predictions_score_three_tenths(backend):
    ev = CocoEvaluator(GT, backend=backend)
    ev.update(shifted())
    s = ev.summarize(verbose=False)
    assert s["AP"] == pytest.approx(0.3)
    assert s["AP50"] == pytest.approx(1.0) and s["AP75"] == pytest.approx(0.0)
    assert [s["APs"], s["APm"], s["APl"]] == pytest.approx([0.3, 0.3, 0.3])
    assert s["AR100"] == pytest.approx(0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_false_positive_ranked_first_halves_precision(backend):
    # One image, one object, a wrong box scored above the right one: precision is 1/2 at every recall.
    gt = {**GT, "annotations": [GT["annotations"][0]]}
    ev = CocoEvaluator(gt, backend=backend)
    ev.update(
        [
            {"image_id": 1, "category_id": 5, "bbox": [150, 150, 20, 20], "score": 0.9},
            {"image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "score": 0.5},
        ],
        image_ids=[1],
    )
    s = ev.summarize(verbose=False)
    assert s["AP"] == pytest.approx(0.5)
    assert s["AR1"] == pytest.approx(0.0) and s["AR10"] == pytest.approx(1.0)
    assert s["per_class_AP"] == {"square": pytest.approx(0.5), "slab": -1.0}  # no "slab" ground truth


def noisy(seed: int, gt: dict) -> list[dict]:
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in gt["categories"]]
    out = []
    for a in gt["annotations"]:
        for _ in range(3):
            x, y, w, h = a["bbox"]
            jitter = rng.normal(0, 0.15, size=4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() < 0.7 else int(rng.choice(cats))
            box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
            out.append(
                {"image_id": a["image_id"], "category_id": cat, "bbox": box, "score": float(rng.random())}
            )
    for img in gt["images"]:  # pure false positives, the empty image included
        for _ in range(2):
            x, y = rng.uniform(0, img["width"] - 10), rng.uniform(0, img["height"] - 10)
            out.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice(cats)),
                    "bbox": [x, y, 10.0, 8.0],
                    "score": float(rng.random()),
                }
            )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree_on_all_stats(seed, tiny_digits):
    ds = CocoDetectionDataset(tiny_digits.images("train"), tiny_digits.annotations("train"))
    for gt in (GT, ds.coco):
        gt_dict = gt if isinstance(gt, dict) else gt.dataset
        results = noisy(seed, gt_dict)
        summaries = []
        for backend in BACKENDS:
            ev = CocoEvaluator(gt, backend=backend)
            ev.update(results)
            summaries.append(ev.summarize(verbose=False))
        fast, ref = summaries
        assert 0.05 < ref["AP50"] < 0.95  # a case that exercises the ranking, not a trivial one
        for k in STAT_NAMES:
            assert fast[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-12), k
        assert fast["per_class_AP"] == pytest.approx(ref["per_class_AP"], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_predictions_give_zeros(backend):
    s = CocoEvaluator(GT, backend=backend).summarize(verbose=False)
    assert [s[k] for k in STAT_NAMES] == [0.0] * 12
    ev = CocoEvaluator(GT, backend=backend)
    ev.update([], image_ids=[1, 2])
    s = ev.summarize(verbose=False)
    assert [s[k] for k in STAT_NAMES] == [0.0] * 12


def test_repeated_image_keeps_its_first_results():
    ev = CocoEvaluator(GT)
    ev.update(perfect())
    ev.update([r for r in perfect() if r["image_id"] == 1], image_ids=[1])  # a padded repeat: quiet
    assert ev.duplicates == 1
    # Other results for a seen image (an image's detections split over two calls) are said, not dropped quietly.
    other = [{"image_id": 1, "category_id": 5, "bbox": [150.0, 150, 5, 5], "score": 1.0}]
    with pytest.warns(
        UserWarning, match="image id 1 was given again with other results; the first ones are kept"
    ):
        ev.update(other, image_ids=[1])
    assert ev.duplicates == 2
    assert ev.summarize(verbose=False)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "bad", [{"bbox": [float("nan"), 1.0, 2.0, 3.0]}, {"score": float("nan")}, {"bbox": [1.0, 2.0, 3.0]}]
)
def test_a_non_finite_or_malformed_result_is_refused(bad):
    # pycocotools scored a NaN box as a correct detection (AP 1.0), faster-coco-eval as a miss.
    result = {"image_id": 1, "category_id": 5, "bbox": [10.0, 10, 5, 5], "score": 0.9, **bad}
    with pytest.raises(ValueError, match=r"result for image id 1 has bbox .*: a bbox is four finite numbers"):
        CocoEvaluator(GT).update([result])


def test_image_ids_restrict_the_scored_images(caplog):
    one = [r for r in perfect() if r["image_id"] == 1]
    ev = CocoEvaluator(GT)
    ev.update(one, image_ids=[1])
    assert ev.summarize(verbose=False)["AP"] == pytest.approx(1.0)
    # Without image_ids every ground-truth image is scored: the unseen ones are misses, and it is said.
    ev = CocoEvaluator(GT)
    ev.update(one)
    with caplog.at_level(logging.WARNING):
        s = ev.summarize(verbose=False)
    assert s["AR100"] == pytest.approx(2 / 6)
    assert "2 of 3 ground-truth images with objects have no results" in caplog.text


def test_bad_results_are_refused():
    ev = CocoEvaluator(GT)
    with pytest.raises(ValueError, match="category id 0"):
        ev.update([{"image_id": 1, "category_id": 0, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="image id 42"):
        ev.update([{"image_id": 42, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(ValueError, match="lacks"):
        ev.update([{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match="backend"):
        CocoEvaluator(GT, backend="detectron")


def test_ground_truth_from_a_file(coco_files):
    _, ann_file = coco_files
    ev = CocoEvaluator(ann_file, backend="pycocotools")
    ev.update([{"image_id": 3, "category_id": 3, "bbox": [5, 5, 10, 10], "score": 1.0}], image_ids=[3])
    assert ev.summarize(verbose=False)["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_without_area_or_iscrowd(backend):
    keys = ("id", "image_id", "category_id", "bbox")
    bare = {**GT, "annotations": [{k: a[k] for k in keys} for a in GT["annotations"]]}
    ev = CocoEvaluator(bare, backend=backend)
    ev.update(perfect())
    # Annotation 7 is now an ordinary "slab" that nobody predicted: recall 1 for "square", 3/4 for "slab".
    assert ev.summarize(verbose=False)["AR100"] == pytest.approx((1.0 + 0.75) / 2)


def test_format_summary_marks_undefined():
    s = {name: -1.0 for name in STAT_NAMES} | {"AP": 0.5, "per_class_AP": {"x": -1.0, "y": 0.25}}
    text = format_summary(s)
    assert text.splitlines()[0].endswith("= 0.500") and text.splitlines()[1].endswith("n/a")
    assert text.splitlines()[-1].strip().endswith("0.250")


def test_postprocess_topk_and_scaling():
    logits = torch.tensor([[[0.0, 3.0], [1.0, -2.0], [2.0, 2.5]]])
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 1.0, 1.0]]])
    (det,) = PostProcess(num_select=3)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )
    # Scores sorted: (query 0, class 1) 3.0, (query 2, class 1) 2.5, (query 2, class 0) 2.0.
    torch.testing.assert_close(det["scores"], torch.tensor([3.0, 2.5, 2.0]).sigmoid())
    assert det["labels"].tolist() == [1, 1, 0]
    torch.testing.assert_close(
        det["boxes"], torch.tensor([[0.0, 0, 100, 50], [100, 50, 200, 100], [100, 50, 200, 100]])
    )
    results = to_coco_results([det], [7], label_to_category_id=[5, 9])
    assert [r["category_id"] for r in results] == [9, 9, 5]
    assert results[0]["bbox"] == pytest.approx([0.0, 0.0, 100.0, 50.0]) and results[0]["image_id"] == 7
    assert results[1]["bbox"] == pytest.approx([100.0, 50.0, 100.0, 50.0])
    (det,) = PostProcess(num_select=100)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )
    assert len(det["scores"]) == 6  # k is capped by N x C
    for bad in ([-1], [2]):  # a negative label would read the last category, one past the end would fail
        wrong = {**det, "labels": torch.tensor(bad * 6)}
        with pytest.raises(ValueError, match=rf"image 7: labels {bad[0]}..{bad[0]} outside the 2 classes"):
            to_coco_results([wrong], [7], label_to_category_id=[5, 9])
    # One (h, w) for two images gave both the first's size; a bare (h, w) failed inside the indexing.
    two = {"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)}
    for sizes in (torch.tensor([[100, 200]]), torch.tensor([100, 200])):
        with pytest.raises(
            ValueError, match=r"orig_sizes has shape .* for 2 images; give one \(h, w\) per image"
        ):
            PostProcess(num_select=3)(two, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_end_to_end_targets_as_predictions_score_one(tiny_digits, backend):
    # Normalised target boxes of resized images, fed back as predictions, land on the original boxes.
    ds = CocoDetectionDataset(
        tiny_digits.images("val"),
        tiny_digits.annotations("val"),
        transforms=make_eval_transforms(size=100, max_size=150),
    )
    post = PostProcess(num_select=20)
    ev = CocoEvaluator(ds.coco, backend=backend)
    for i in range(len(ds)):
        _, t = ds[i]
        n = 8
        logits = torch.full((1, n, ds.num_classes), -8.0)
        boxes = torch.tensor([0.0, 0.0, 0.1, 0.1]).repeat(1, n, 1)
        m = len(t["labels"])
        logits[0, torch.arange(m), t["labels"]] = 6.0
        boxes[0, :m] = t["boxes_normalized"]
        dets = post({"pred_logits": logits, "pred_boxes": boxes}, t["orig_size"][None])
        ev.update(to_coco_results(dets, [t["image_id"]], ds.label_to_category_id), image_ids=[t["image_id"]])
    s = ev.summarize(verbose=False)
    assert s["AP50"] == pytest.approx(1.0) and s["AP75"] == pytest.approx(1.0)
    assert s["AP"] > 0.95


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_post_processing_with_nms_works_in_the_models_precision(dtype):
    """A model in float64 or half precision: the boxes were cast to float32 and the scores were not, so
    torchvision's NMS refused them (the digits recipe sets nms_iou). Both come back in float32."""
    logits = torch.tensor([[[4.0, -4.0], [3.0, -4.0], [-4.0, 2.0]]], dtype=dtype)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.11, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9]]], dtype=dtype)
    (det,) = PostProcess(num_select=3, nms_iou=0.7)(
        {"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]])
    )
    assert det["scores"].dtype == det["boxes"].dtype == torch.float32
    assert det["labels"].tolist() == [0, 1]  # the near-duplicate of the first box is suppressed
    assert det["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item(), rel=1e-2)
