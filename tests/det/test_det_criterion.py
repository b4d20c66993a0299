"""Set criterion values against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from implicitkit_det.losses import HungarianMatcher, SetCriterion


def fl(logit: float, y: int, alpha: float = 0.25, gamma: float = 2.0) -> float:
    """Sigmoid focal loss of one logit, written out."""
    p = 1 / (1 + math.exp(-logit))
    if y == 1:
        return alpha * (1 - p) ** gamma * -math.log(p)
    return (1 - alpha) * p**gamma * -math.log(1 - p)


def giou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


LOGITS = [[[0.0, 0.0], [2.0, -1.0], [-0.5, 1.5]], [[1.0, -2.0], [0.3, 0.2], [-1.0, -1.0]]]
BOXES = [
    [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.6], [0.0, 0.5, 0.3, 0.9]],
    [[0.5, 0.5, 1.0, 1.0], [0.12, 0.2, 0.33, 0.45], [0.4, 0.0, 0.6, 0.3]],
]
TARGETS = [
    {"labels": torch.tensor([1]), "boxes_normalized": torch.tensor([[0.1, 0.1, 0.5, 0.5]])},
    {
        "labels": torch.tensor([0, 1]),
        "boxes_normalized": torch.tensor([[0.6, 0.5, 1.0, 0.9], [0.1, 0.1, 0.3, 0.4]]),
    },
]
# Matches given explicitly: image 0 query 1 -> target 0; image 1 query 0 -> target 0, query 1 -> target 1.
INDICES = [(torch.tensor([1]), torch.tensor([0])), (torch.tensor([0, 1]), torch.tensor([0, 1]))]


def hand_losses():
    matched = {(0, 1): 0, (1, 0): 0, (1, 1): 1}  # (image, query) -> target
    focal = 0.0
    for b in range(2):
        for q in range(3):
            for c in range(2):
                t = matched.get((b, q))
                y = int(t is not None and TARGETS[b]["labels"][t].item() == c)
                focal += fl(LOGITS[b][q][c], y)
    l1 = g = 0.0
    for (b, q), t in matched.items():
        tb = TARGETS[b]["boxes_normalized"][t].tolist()
        l1 += sum(abs(x - y) for x, y in zip(BOXES[b][q], tb))
        g += 1 - giou(BOXES[b][q], tb)
    n = 3  # targets in the batch
    return focal / n, l1 / n, g / n


def test_values_against_hand_computation():
    outputs = {
        "pred_logits": torch.tensor(LOGITS, dtype=torch.float64),
        "pred_boxes": torch.tensor(BOXES, dtype=torch.float64),
    }
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in TARGETS]
    losses = SetCriterion()(outputs, targets, indices=INDICES)
    focal, l1, g = hand_losses()
    assert losses["focal"].item() == pytest.approx(focal, rel=1e-9)
    assert losses["l1"].item() == pytest.approx(l1, rel=1e-9)
    assert losses["giou"].item() == pytest.approx(g, rel=1e-5)  # torchvision's GIoU adds eps = 1e-7
    assert losses["loss_focal"].item() == pytest.approx(2 * focal, rel=1e-9)
    assert losses["loss_l1"].item() == pytest.approx(5 * l1, rel=1e-9)
    assert losses["loss_giou"].item() == pytest.approx(2 * g, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * focal + 5 * l1 + 2 * g, rel=1e-5)


def test_weights_are_parameters():
    outputs = {"pred_logits": torch.tensor(LOGITS), "pred_boxes": torch.tensor(BOXES)}
    losses = SetCriterion(weight_focal=1.0, weight_l1=0.0, weight_giou=3.0)(outputs, TARGETS, indices=INDICES)
    torch.testing.assert_close(losses["loss"], losses["focal"] + 3 * losses["giou"])


def test_uses_the_matcher_when_no_indices_are_given():
    outputs = {"pred_logits": torch.tensor(LOGITS), "pred_boxes": torch.tensor(BOXES)}
    matcher = HungarianMatcher()
    expected = SetCriterion()(outputs, TARGETS, indices=matcher(outputs, TARGETS))
    got = SetCriterion(matcher=matcher)(outputs, TARGETS)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    # Image 0's target equals query 0's box exactly, so the matcher picks query 0, not the given query 1.
    assert matcher(outputs, TARGETS)[0][0].tolist() == [0]


def test_no_targets_gives_pure_negative_focal_and_flowing_gradients():
    logits = torch.tensor(LOGITS, requires_grad=True)
    boxes = torch.tensor(BOXES, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes_normalized": torch.zeros(0, 4)}
    losses = SetCriterion()({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    negatives = sum(fl(v, 0) for img in LOGITS for q in img for v in q)
    assert losses["focal"].item() == pytest.approx(negatives, rel=1e-6)  # normaliser clamped to 1
    assert losses["l1"].item() == 0.0 and losses["giou"].item() == 0.0
    losses["loss"].backward()
    assert logits.grad is not None and boxes.grad is not None
    assert torch.count_nonzero(boxes.grad) == 0


def test_gradient_matches_finite_differences():
    # No predicted box shares a coordinate with its target, so L1 and GIoU are smooth here.
    outputs = {
        "pred_logits": torch.tensor(LOGITS, dtype=torch.float64, requires_grad=True),
        "pred_boxes": torch.tensor(BOXES, dtype=torch.float64, requires_grad=True),
    }
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in TARGETS]
    crit = SetCriterion()

    def f(logits, boxes):
        return crit({"pred_logits": logits, "pred_boxes": boxes}, targets, indices=INDICES)["loss"]

    assert torch.autograd.gradcheck(f, (outputs["pred_logits"], outputs["pred_boxes"]))


def test_num_positives_single_process():
    assert SetCriterion.num_positives(TARGETS, torch.device("cpu")).item() == 3.0
    empty = {"labels": torch.zeros(0, dtype=torch.int64)}
    assert SetCriterion.num_positives([empty], torch.device("cpu")).item() == 1.0


@pytest.mark.parametrize("one_to_many", [1, 2])
def test_branches_in_one_batch_equal_branch_by_branch(one_to_many):
    # Three branches of the same images (the second image without targets), matched here: the batched call
    # is one cost matrix and one reduction per term, and must give each branch forward()'s numbers and
    # gradients (forward() itself is checked against the hand computation above).
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor(LOGITS, dtype=torch.float64) + torch.randn(
        3, 2, 3, 2, generator=gen, dtype=torch.float64
    )
    boxes = torch.tensor(BOXES, dtype=torch.float64) + 0.05 * torch.rand(
        3, 2, 3, 4, generator=gen, dtype=torch.float64
    )
    empty = {
        "labels": torch.zeros(0, dtype=torch.int64),
        "boxes_normalized": torch.zeros(0, 4, dtype=torch.float64),
    }
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in TARGETS[0].items()}, empty]
    crit = SetCriterion(one_to_many=one_to_many)

    def branches(lg, bx):
        return {f"b{i}": {"pred_logits": lg[i], "pred_boxes": bx[i]} for i in range(3)}

    one_by_one = {}
    grads = []
    for batched in (False, True):
        lg, bx = logits.clone().requires_grad_(), boxes.clone().requires_grad_()
        if batched:
            out = crit.branch_losses(branches(lg, bx), targets)
        else:
            out = {name: crit(o, targets) for name, o in branches(lg, bx).items()}
        sum(terms["loss"] for terms in out.values()).backward()
        grads.append((lg.grad, bx.grad))
        if not batched:
            one_by_one = out
    assert out.keys() == one_by_one.keys()
    for name, terms in out.items():
        assert terms.keys() == one_by_one[name].keys()
        for key, value in terms.items():
            torch.testing.assert_close(value, one_by_one[name][key], rtol=1e-12, atol=1e-12)
    assert len({round(t["loss"].item(), 6) for t in out.values()}) == 3  # three different branches
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grads[1][1][:, 0]) > 0  # the matched boxes of image 0 get a gradient


def test_branches_of_other_query_counts_are_scored_as_branch_by_branch():
    """An auxiliary branch with its own query count (a one-to-many set) failed in torch.cat."""
    gen = torch.Generator().manual_seed(1)
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in TARGETS[0].items()}]
    branches = {
        name: {
            "pred_logits": torch.randn(1, n, 2, generator=gen, dtype=torch.float64),
            "pred_boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6]], dtype=torch.float64).repeat(1, n, 1)
            + 0.05 * torch.rand(1, n, 4, generator=gen, dtype=torch.float64),
        }
        for name, n in (("one", 3), ("many", 5), ("one_again", 3))
    }
    crit = SetCriterion()
    stacked = crit.branch_losses(branches, targets)
    assert list(stacked) == list(branches)
    for name, outputs in branches.items():
        torch.testing.assert_close(stacked[name]["loss"], crit(outputs, targets)["loss"], rtol=1e-12, atol=0)


def test_a_non_finite_branch_is_named_with_its_image_not_its_stacked_row():
    logits, boxes = torch.zeros(2, 3, 2), torch.tensor([0.1, 0.1, 0.5, 0.6]).repeat(2, 3, 1)
    broken = boxes.clone()
    broken[0, 1] = float("nan")
    targets = [{**TARGETS[0], "image_id": 7}, {**TARGETS[0], "image_id": 8}]
    branches = {"init": {"pred_logits": logits, "pred_boxes": boxes}}
    branches["rag_s6"] = {"pred_logits": logits, "pred_boxes": broken}
    with pytest.raises(
        FloatingPointError, match=r"branch rag_s6, image 0 \(image_id 7\): its predictions are"
    ):
        SetCriterion().branch_losses(branches, targets)


def test_focal_alpha_below_zero_means_no_weighting_in_the_matcher_as_in_the_loss():
    """torchvision's sigmoid_focal_loss reads alpha=-1 as no weighting; the matcher flipped the positive cost."""
    from implicitkit_det.losses.matcher import focal_cost

    logits = torch.tensor([[0.0], [-6.0]], dtype=torch.float64)
    labels = torch.zeros(1, dtype=torch.int64)
    p = logits.sigmoid()
    unweighted = (1 - p) ** 2 * -torch.log(p) - p**2 * -torch.log(1 - p)
    torch.testing.assert_close(focal_cost(logits, labels, alpha=-1.0), unweighted)
    outputs = {
        "pred_logits": logits.T[None].transpose(1, 2),
        "pred_boxes": torch.tensor([[[0.1, 0.1, 0.5, 0.6]] * 2]),
    }
    target = [{"labels": labels, "boxes_normalized": torch.tensor([[0.1, 0.1, 0.5, 0.6]])}]
    ((rows, _),) = HungarianMatcher(focal_alpha=-1.0)(outputs, target)
    assert rows.tolist() == [0]  # the query that says the class (p 0.5), not the one sure it is not


def test_a_target_and_a_prediction_without_area_are_matched_not_called_diverged():
    """GIoU of two boxes without area is 0 / 0: the matcher said the model had diverged. A zero-area
    prediction comes from RAP's unsorted corners collapsing to one."""
    import torchvision

    pred = torch.tensor([[[0.7, 0.6, 0.7, 0.9], [0.1, 0.1, 0.3, 0.3]]])
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_boxes": pred}
    line = torch.tensor([[0.7, 0.6, 0.7, 0.9]])
    target = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes_normalized": line}]
    ((rows, cols),) = HungarianMatcher()(outputs, target)
    assert rows.tolist() == [0] and cols.tolist() == [0]  # the same line, not the distant box
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    cost = matcher.cost_matrix(outputs["pred_logits"][0], pred[0], target[0]["labels"], line)
    criterion_giou = 1 - torchvision.ops.generalized_box_iou_loss(pred[0], line.expand(2, 4))
    torch.testing.assert_close(cost[:, 0], -criterion_giou)  # the criterion's own GIoU, pair by pair
