"""Where the queries start: the whole image (the published design) or one cell of a grid each."""

from __future__ import annotations

import warnings

import pytest
import torch

from implicitkit_det.models import build_model
from implicitkit_det.models.boxes import xyzr_to_xyxy
from implicitkit_det.models.queries import InitialQueries, grid_cells

SIZES = torch.tensor([[128.0, 192.0], [100.0, 150.0]])  # (h, w) per image


@pytest.mark.parametrize(("n", "rows", "cols"), [(10, 2, 5), (20, 4, 5), (100, 10, 10), (7, 1, 7), (1, 1, 1)])
def test_grid_cells_tile_the_image_once(n, rows, cols):
    cells = grid_cells(n)
    widths, heights = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
    assert torch.allclose(widths, torch.full((n,), 1 / cols)) and torch.allclose(
        heights, torch.full((n,), 1 / rows)
    )
    # n disjoint cells of area 1/n inside the unit square cover it: check disjointness through the centres.
    assert cells.min() >= 0 and cells.max() <= 1 + 1e-6
    centres = torch.stack([(cells[:, 0] + cells[:, 2]) / 2, (cells[:, 1] + cells[:, 3]) / 2], dim=-1)
    assert len({tuple(c) for c in (centres * 1000).round().tolist()}) == n
    assert torch.allclose((widths * heights).sum(), torch.tensor(1.0))


def test_image_boxes_are_the_whole_unpadded_image():
    state = InitialQueries(4, 8)(SIZES)
    expected = torch.tensor([[0.0, 0.0, 192.0, 128.0], [0.0, 0.0, 150.0, 100.0]])[:, None].expand(2, 4, 4)
    assert torch.allclose(xyzr_to_xyxy(state["xyzr"]), expected, atol=1e-4)


def test_grid_boxes_are_the_cells_scaled_to_each_image():
    state = InitialQueries(10, 8, "grid")(SIZES)
    h, w = SIZES.unbind(-1)
    expected = grid_cells(10)[None] * torch.stack([w, h, w, h], dim=-1)[:, None]
    assert torch.allclose(xyzr_to_xyxy(state["xyzr"]), expected, atol=1e-4)
    assert torch.equal(state["content"][0], state["content"][1])  # content does not depend on the image


def test_unknown_boxes_are_refused():
    with pytest.raises(ValueError, match="'image' or 'grid'"):
        InitialQueries(4, 8, "corners")


def test_the_config_option_reaches_the_detector():
    image = build_model("deqdet_tiny", num_classes=3, num_queries=10)
    grid = build_model("deqdet_tiny", num_classes=3, num_queries=10, query_boxes="grid")
    assert image.queries(SIZES)["xyzr"][0, :, :2].unique(dim=0).shape[0] == 1  # all at the image centre
    assert grid.queries(SIZES)["xyzr"][0, :, :2].unique(dim=0).shape[0] == 10
    assert image.state_dict().keys() == grid.state_dict().keys()  # checkpoints load into either
    assert all(q.queries.fractions.is_contiguous() for q in (image, grid))  # DDP broadcasts it in place


def test_loading_queries_trained_with_other_boxes_warns_and_older_state_dicts_load_quietly():
    """Their start boxes are no weights: a grid-trained state dict loaded strictly into an image-box model
    changed every detection without a word."""
    grid, image = InitialQueries(6, 8, boxes="grid"), InitialQueries(6, 8, boxes="image")
    with pytest.warns(
        UserWarning, match=r"trained with query_boxes='grid' into a model with query_boxes='image'"
    ):
        image.load_state_dict(grid.state_dict())
    older = {k: v for k, v in grid.state_dict().items() if k != "on_grid"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image.load_state_dict(older)  # saved before the kind was recorded: no key, no warning
        grid.load_state_dict(InitialQueries(6, 8, boxes="grid").state_dict())
