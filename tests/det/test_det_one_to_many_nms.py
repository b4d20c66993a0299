"""One-to-many matching in the set loss, and class-wise NMS in the post-processing."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from implicitkit_det.evaluation import PostProcess
from implicitkit_det.losses import SetCriterion
from implicitkit_det.models import build_model


def test_one_to_many_matches_each_target_k_times_and_normalises_by_k():
    target = torch.tensor([[0.2, 0.2, 0.6, 0.6]], dtype=torch.float64)
    boxes = torch.tensor(
        [[[0.21, 0.2, 0.6, 0.61], [0.7, 0.7, 0.9, 0.9], [0.2, 0.19, 0.62, 0.6], [0.0, 0.0, 0.1, 0.1]]],
        dtype=torch.float64,
    )
    logits = torch.full((1, 4, 3), -2.0, dtype=torch.float64)
    logits[0, [0, 2], 1] = 1.0  # the two predictions on the object say class 1
    targets = [{"labels": torch.tensor([1]), "boxes_normalized": target}]
    got = SetCriterion(one_to_many=2)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # By hand: predictions 0 and 2 are positives of class 1, and P counts the target twice.
    onehot = torch.zeros_like(logits)
    onehot[0, [0, 2], 1] = 1.0
    focal = sigmoid_focal_loss(logits, onehot, 0.25, 2.0, reduction="sum") / 2
    l1 = (boxes[0, [0, 2]] - target).abs().sum() / 2
    giou = generalized_box_iou_loss(boxes[0, [0, 2]], target.expand(2, 4), reduction="sum") / 2
    torch.testing.assert_close(got["focal"], focal)
    torch.testing.assert_close(got["l1"], l1)
    torch.testing.assert_close(got["giou"], giou)
    one_to_one = SetCriterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert float(one_to_one["l1"]) < float(got["l1"]) * 2  # one match only: the better of the two
    with pytest.raises(ValueError, match="one_to_many must be a positive"):
        SetCriterion(one_to_many=0)


def test_nms_keeps_the_best_of_overlapping_same_class_detections():
    # Three queries, two classes: queries 0 and 1 overlap (IoU 0.9), query 2 is elsewhere.
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.46], [0.6, 0.6, 0.9, 0.9]]])
    logits = torch.tensor([[[2.0, -9.0], [1.0, 0.5], [0.0, -9.0]]])
    sizes = torch.tensor([[100, 100]])
    plain = PostProcess(num_select=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    nms = PostProcess(num_select=4, nms_iou=0.7)({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    assert plain["labels"].tolist() == [0, 0, 1, 0]  # scores 0.88, 0.73, 0.62, 0.50
    # Query 1's class 0 is removed by query 0 (same class, IoU 0.9); its class 1 has no rival and stays.
    assert nms["labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(nms["scores"], plain["scores"][[0, 2, 3]])
    torch.testing.assert_close(nms["boxes"][1], torch.tensor([10.0, 10.0, 50.0, 46.0]))
    with pytest.raises(ValueError, match="nms_iou must be in"):
        PostProcess(nms_iou=0.0)


def test_model_config_reaches_criterion_and_postprocess():
    for config in ("deqdet_tiny", "adamixer_tiny", "sparse_rcnn_tiny", "deq_sparse_rcnn_tiny"):
        model = build_model(config, 10, one_to_many=3, nms_iou=0.6)
        assert model.criterion.one_to_many == 3 and model.postprocess.nms_iou == 0.6, config
