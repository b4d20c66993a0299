"""Hungarian matcher: optimal on hand-made cases, the costs by hand, empty targets, NaN guard."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from implicitkit_det.losses import HungarianMatcher, focal_cost


def target(labels, boxes):
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes_normalized": torch.tensor(boxes).reshape(-1, 4),
    }


def pairs(match):
    src, tgt = match
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    return sorted(zip(src.tolist(), tgt.tolist()))


def test_l1_only_needs_the_global_optimum_not_the_greedy_one():
    # L1 costs: p0-t0 0.4, p0-t1 1.2, p1-t0 0.8, p1-t1 2.4. Greedy takes p0-t0 first (total 2.8); the
    # optimum is p0-t1 + p1-t0 (total 2.0).
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    outputs = {
        "pred_logits": torch.zeros(1, 2, 3),
        "pred_boxes": torch.tensor([[[0.3, 0.3, 0.5, 0.5], [0.6, 0.6, 0.8, 0.8]]]),
    }
    tgt = target([0, 1], [[0.4, 0.4, 0.6, 0.6], [0.0, 0.0, 0.2, 0.2]])
    cost = matcher.cost_matrix(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], tgt["labels"], tgt["boxes_normalized"]
    )
    torch.testing.assert_close(cost, torch.tensor([[0.4, 1.2], [0.8, 2.4]]))
    assert pairs(matcher(outputs, [tgt])[0]) == [(0, 1), (1, 0)]


def test_class_and_box_agree_on_the_obvious_match():
    # Three queries, two targets; query 2 is target 0 exactly (box and class), query 0 is target 1.
    matcher = HungarianMatcher()
    boxes = torch.tensor([[[0.5, 0.5, 0.9, 0.9], [0.0, 0.4, 0.3, 0.6], [0.1, 0.1, 0.3, 0.3]]])
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 3] = 5.0
    tgt = target([1, 3], [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]])
    ((src, tgt_idx),) = matcher({"pred_logits": logits, "pred_boxes": boxes}, [tgt])
    assert src.tolist() == [0, 2] and tgt_idx.tolist() == [1, 0]  # sorted by prediction index


def test_cost_entries_by_hand():
    matcher = HungarianMatcher()  # 2 focal + 5 L1 - 2 GIoU
    logit = 0.7
    box = torch.tensor([[0.2, 0.2, 0.6, 0.6]])
    tbox = torch.tensor([[0.1, 0.1, 0.5, 0.5]])
    cost = matcher.cost_matrix(torch.tensor([[0.0, logit]]), box, torch.tensor([1]), tbox)
    p = 1 / (1 + math.exp(-logit))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p) - 0.75 * p**2 * -math.log(1 - p)
    l1 = 4 * 0.1
    inter, union, hull = 0.3 * 0.3, 2 * 0.16 - 0.09, 0.5 * 0.5
    giou = inter / union - (hull - union) / hull
    assert cost.item() == pytest.approx(2 * focal + 5 * l1 - 2 * giou, rel=1e-6)
    # The focal cost is stable where log(p) would overflow.
    assert torch.isfinite(focal_cost(torch.tensor([[-200.0, 200.0]]), torch.tensor([0, 1]))).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("n", "m"), [(4, 3), (3, 3), (2, 4)])
def test_matches_brute_force_optimum(seed, n, m):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n + m, 2, generator=g) * 0.6
    wh = torch.rand(n + m, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([xy, xy + wh], dim=1)
    outputs = {"pred_logits": torch.randn(1, n, 5, generator=g), "pred_boxes": boxes[None, :n]}
    tgt = {"labels": torch.randint(5, (m,), generator=g), "boxes_normalized": boxes[n:]}
    matcher = HungarianMatcher()
    c = matcher.cost_matrix(outputs["pred_logits"][0], boxes[:n], tgt["labels"], boxes[n:])
    # Exhaustive search over all injective assignments of the smaller side.
    if n >= m:
        best = min(sum(c[p[j], j].item() for j in range(m)) for p in itertools.permutations(range(n), m))
    else:
        best = min(sum(c[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(m), n))
    src, tgt_idx = matcher(outputs, [tgt])[0]
    assert (
        len(src) == min(n, m)
        and len(set(src.tolist())) == len(src)
        and len(set(tgt_idx.tolist())) == len(tgt_idx)
    )
    assert c[src, tgt_idx].sum().item() == pytest.approx(best, abs=1e-5)


def test_zero_targets_and_mixed_batch():
    matcher = HungarianMatcher()
    outputs = {
        "pred_logits": torch.randn(3, 5, 2),
        "pred_boxes": torch.tensor([0.1, 0.1, 0.4, 0.4]).repeat(3, 5, 1),
    }
    empty = target([], [])
    out = matcher(outputs, [empty, empty, empty])
    assert all(len(s) == 0 and len(t) == 0 and s.dtype == torch.int64 for s, t in out)
    one = target([1], [[0.1, 0.1, 0.4, 0.4]])
    out = matcher(outputs, [empty, one, empty])
    assert [len(s) for s, _ in out] == [0, 1, 0]
    assert out[1][1].tolist() == [0]


def test_nan_cost_is_a_clear_error():
    matcher = HungarianMatcher()
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.4], [float("nan"), 0.1, 0.4, 0.4]]])
    with pytest.raises(FloatingPointError, match=r"image 0 \(image_id 9\).*pred_boxes finite: False"):
        matcher(
            {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": boxes},
            [{**target([0], [[0.1, 0.1, 0.2, 0.2]]), "image_id": 9}],
        )
    logits = torch.tensor([[[float("inf"), 0.0], [0.0, 0.0]]])
    with pytest.raises(FloatingPointError, match="pred_logits finite: False"):
        matcher(
            {"pred_logits": logits, "pred_boxes": boxes.nan_to_num(0.2)},
            [target([0], [[0.1, 0.1, 0.2, 0.2]])],
        )


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match="2 images in the outputs but 1 targets"):
        HungarianMatcher()(
            {"pred_logits": torch.zeros(2, 3, 2), "pred_boxes": torch.zeros(2, 3, 4)}, [target([], [])]
        )


@pytest.mark.parametrize(
    ("labels", "boxes", "error", "message"),
    [
        (
            [-1],
            [0.1, 0.1, 0.4, 0.5],
            ValueError,
            r"labels of image 1 .* include \[-1\], outside 0\.\.4",
        ),  # was C-1
        ([5], [0.1, 0.1, 0.4, 0.5], ValueError, r"include \[5\], outside 0\.\.4.*not category ids"),
        ([4], [0.4, 0.5, 0.1, 0.1], ValueError, r"boxes_normalized of image 1 .*x0 <= x1"),  # corners swapped
        ([4], [9.6, 9.6, 38.4, 48.0], ValueError, r"not pixels"),  # scored as a huge box
        (
            [4.0],
            [0.1, 0.1, 0.4, 0.5],
            TypeError,
            r"integer class indices; image 1 .*torch.zeros\(0, dtype=torch.int64\)",
        ),
        # Joined with the other image's int64 labels, bool ones became classes 0 and 1 without an error.
        ([True], [0.1, 0.1, 0.4, 0.5], TypeError, r"image 1 .* has torch.bool labels"),
        ([1, 2], [0.1, 0.1, 0.4, 0.5], ValueError, r"image 1 .* has 2 labels for 1 boxes"),
    ],
    ids=["negative label", "label = classes", "swapped corners", "pixels", "float label", "bool label",
         "more labels than boxes"],
)  # fmt: skip
def test_targets_that_would_be_scored_wrongly_are_refused(labels, boxes, error, message):
    """Through the criterion, as training meets them: the second image's target is the bad one."""
    from implicitkit_det.losses import SetCriterion

    outputs = {
        "pred_logits": torch.zeros(2, 3, 5),
        "pred_boxes": torch.tensor([0.1, 0.1, 0.4, 0.5]).repeat(2, 3, 1),
    }
    good = target([1], [0.2, 0.2, 0.6, 0.6])
    bad = {"labels": torch.tensor(labels), "boxes_normalized": torch.tensor(boxes).reshape(-1, 4)}
    with pytest.raises(error, match=message):
        SetCriterion()(outputs, [good, bad])
    edges = target([0, 4], [[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])  # whole image, a point: valid
    assert torch.isfinite(SetCriterion()(outputs, [good, edges])["loss"])


def test_targets_the_matcher_cannot_read_are_named_before_any_work():
    """torchvision-style targets gave a bare KeyError 'boxes_normalized'; a batch without any object whose
    labels were torch.tensor([]) (float) passed the early return and failed later, with an IndexError."""
    from implicitkit_det.losses import SetCriterion

    outputs = {"pred_logits": torch.zeros(1, 3, 5), "pred_boxes": torch.rand(1, 3, 4)}
    pixels = {"labels": torch.tensor([1]), "boxes": torch.tensor([[10.0, 10.0, 40.0, 50.0]])}
    with pytest.raises(KeyError, match=r"image 0 .* need 'labels' .* and 'boxes_normalized'"):
        SetCriterion()(outputs, [pixels])
    nothing = {"labels": torch.tensor([]), "boxes_normalized": torch.zeros(0, 4)}
    with pytest.raises(TypeError, match=r"torch.float32 labels .*torch.zeros\(0, dtype=torch.int64\)"):
        SetCriterion()(outputs, [nothing])
