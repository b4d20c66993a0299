"""Box parametrisation, its sinusoidal encoding, IoF and the box update, against hand computations."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from implicitkit_det.models import box_iof, position_encoding, refine_boxes, xyxy_to_xyzr, xyzr_to_xyxy

coords = st.floats(-500.0, 1500.0, allow_nan=False, allow_infinity=False)
sides = st.floats(0.5, 1000.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(x0=coords, y0=coords, w=sides, h=sides)
def test_xyxy_xyzr_round_trip(x0, y0, w, h):
    boxes = torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float64)
    xyzr = xyxy_to_xyzr(boxes)
    torch.testing.assert_close(xyzr_to_xyxy(xyzr), boxes, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(xyxy_to_xyzr(xyzr_to_xyxy(xyzr)), xyzr, rtol=1e-12, atol=1e-9)


def test_xyzr_is_centre_log_scale_log_aspect():
    xyzr = xyxy_to_xyzr(torch.tensor([[10.0, 20.0, 18.0, 52.0]]))  # w 8, h 32
    torch.testing.assert_close(xyzr, torch.tensor([[14.0, 36.0, math.log2(16.0), 2.0]]))
    # A square box has r = 0, and z = log2 of its side.
    torch.testing.assert_close(
        xyxy_to_xyzr(torch.tensor([[0.0, 0.0, 64.0, 64.0]])), torch.tensor([[32.0, 32.0, 6.0, 0.0]])
    )
    # Degenerate boxes stay finite.
    assert torch.isfinite(xyxy_to_xyzr(torch.tensor([[5.0, 5.0, 5.0, 9.0]]))).all()


def test_position_encoding_by_hand():
    xyzr = torch.tensor([[[500.0, 250.0, 3.0, -1.0]]])
    pe = position_encoding(xyzr, num_feats=64)
    assert pe.shape == (1, 1, 256)
    values = [0.5, 0.25, 3.0, -1.0]  # x / 1000, y / 1000, z, r
    for c, v in enumerate(values):
        for k in (0, 1, 2, 17, 62, 63):
            angle = v / 10000 ** (2 * (k // 2) / 64)
            want = math.sin(angle) if k % 2 == 0 else math.cos(angle)
            assert abs(pe[0, 0, 64 * c + k].item() - want) < 1e-6, (c, k)


def test_iof_by_hand_and_asymmetric():
    big = torch.tensor([0.0, 0.0, 10.0, 10.0])
    small = torch.tensor([2.0, 2.0, 4.0, 4.0])  # inside big
    half = torch.tensor([5.0, 0.0, 15.0, 10.0])  # overlaps big by half
    far = torch.tensor([20.0, 20.0, 30.0, 30.0])
    boxes = torch.stack([big, small, half, far])[None]  # batched [1, 4, 4]
    iof = box_iof(boxes, boxes)[0]
    want = torch.tensor(
        [
            [1.0, 0.04, 0.5, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [0.5, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    torch.testing.assert_close(iof, want)


def test_refine_boxes_moves_centre_in_units_of_scale():
    xyzr = torch.tensor([[100.0, 50.0, 4.0, 1.0]])
    delta = torch.tensor([[0.5, -0.25, 1.0, -2.0]])
    torch.testing.assert_close(refine_boxes(xyzr, delta), torch.tensor([[108.0, 46.0, 5.0, -1.0]]))
