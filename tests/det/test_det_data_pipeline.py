"""The official training pipeline's data side: empty images left out, batches grouped by aspect ratio."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from implicitkit_det.data import CocoDetectionDataset, GroupedBatchSampler, aspect_ratio_groups


def test_remove_empty_leaves_out_images_without_a_box(make_coco):
    # Image 2 has no annotation, image 4 only a crowd region: no box to learn from in either.
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 3, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 9, "image_id": 4, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 1},
    ]
    images = {1: (80, 60), 2: (64, 64), 3: (50, 70), 4: (40, 40)}
    root, ann = make_coco(annotations=annotations, images=images)
    kept = CocoDetectionDataset(root, ann)
    assert kept.ids == [1, 2, 3, 4] and kept.removed_empty == 0
    train = CocoDetectionDataset(root, ann, remove_empty=True)
    assert train.ids == [1, 3] and train.removed_empty == 2
    assert all(len(train[i][1]["boxes"]) > 0 for i in range(len(train)))
    assert sorted(train.coco.imgs) == [1, 2, 3, 4]  # the evaluation index keeps every image
    assert train.aspect_ratios == [80 / 60, 50 / 70]


def test_aspect_ratio_groups_split_at_the_bin_edges():
    assert aspect_ratio_groups([0.5, 1.0, 1.01, 2.0]) == [0, 0, 1, 1]
    assert aspect_ratio_groups([0.5, 1.0, 1.5, 3.0], bins=(0.75, 1.25, 2.0)) == [0, 1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(
    ratios=st.lists(st.sampled_from([0.6, 0.75, 1.33, 1.5]), min_size=1, max_size=40),
    batch_size=st.integers(1, 5),
    world=st.integers(1, 3),
    epoch=st.integers(0, 3),
)
def test_grouped_batches_cover_every_index_once_with_similar_aspect_ratios(ratios, batch_size, world, epoch):
    groups = aspect_ratio_groups(ratios)
    data = list(range(len(ratios)))
    counts = []
    for rank in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=7)
        batcher = GroupedBatchSampler(sampler, groups, batch_size)
        batcher.set_epoch(epoch)
        batches = list(batcher)
        order = list(sampler)
        assert sorted(i for b in batches for i in b) == sorted(order)  # each index of the share, once
        assert len(batches) == len(batcher) and all(1 <= len(b) <= batch_size for b in batches)
        full = [b for b in batches if len(b) == batch_size]
        # Only the leftovers (fewer than batch_size per group, two groups) can mix, in the last two batches.
        mixed = [k for k, b in enumerate(batches) if len({groups[i] for i in b}) > 1]
        assert all(k >= len(batches) - 2 for k in mixed)
        assert len(full) >= len(batches) - 2
        again = GroupedBatchSampler(sampler, groups, batch_size)
        again.set_epoch(epoch)
        assert list(again) == batches  # deterministic given (seed, epoch)
        counts.append(len(batches))
    assert len(set(counts)) == 1  # every process runs the same number of iterations


def test_grouping_reduces_padding():
    torch.manual_seed(0)
    ratios = [0.6, 1.5] * 32
    groups = aspect_ratio_groups(ratios)
    sampler = DistributedSampler(list(range(64)), num_replicas=1, rank=0, shuffle=True, seed=0)
    grouped = list(GroupedBatchSampler(sampler, groups, 4))
    plain = [list(sampler)[i : i + 4] for i in range(0, 64, 4)]

    def padded_area(batches):  # each image's longer side is 1: pad to the largest height and width
        sizes = [(1.0, r) if r < 1 else (1 / r, 1.0) for r in ratios]
        return sum(len(b) * max(sizes[i][0] for i in b) * max(sizes[i][1] for i in b) for b in batches)

    assert all(len({groups[i] for i in b}) == 1 for b in grouped)
    assert padded_area(grouped) < 0.8 * padded_area(plain)
