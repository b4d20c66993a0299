"""Distributed helpers without a process group, and a real two-process (gloo) run of the evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicitkit_det import collectives as D
from implicitkit_det.evaluation import CocoEvaluator
from implicitkit_det.losses import SetCriterion

GT = {
    "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2, 3)],
    "categories": [{"id": 1, "name": "thing"}],
    "annotations": [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [10.0 * i, 10, 30, 30], "area": 900, "iscrowd": 0}
        for i in (1, 2, 3)
    ],
}


def right(image_id: int) -> dict:
    return {"image_id": image_id, "category_id": 1, "bbox": [10.0 * image_id, 10, 30, 30], "score": 0.9}


def test_helpers_without_a_process_group():
    assert not D.is_dist()
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    t = torch.tensor([1.0, 2.0])
    out = D.all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    assert D.gather_object(5) == [5]
    assert D.broadcast_object("x") == "x"


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        report = {
            "rank": D.get_rank(),
            "world": D.get_world_size(),
            "mean": D.all_reduce_mean(torch.tensor(float(rank + 1))).item(),
            "gathered": D.all_gather_object(rank * 10),
            # Rank 0 holds 3 targets, rank 1 holds 1: the normaliser is their mean, 2.
            "num_pos": SetCriterion.num_positives(
                [{"labels": torch.zeros(3 - 2 * rank, dtype=torch.int64)}], torch.device("cpu")
            ).item(),
        }
        ev = CocoEvaluator(GT)
        if rank == 0:
            ev.update([right(1), right(2)], image_ids=[1, 2])
        else:
            # Image 1 again, as a padding sampler would give it, with wrong boxes: must be dropped.
            wrong = {"image_id": 1, "category_id": 1, "bbox": [70.0, 70, 20, 20], "score": 1.0}
            ev.update([right(3), wrong], image_ids=[3, 1])
        ev.synchronize()
        report["duplicates"] = ev.duplicates
        report["num_images"] = ev.num_images
        report["summary"] = ev.summarize(verbose=False)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
def test_two_process_evaluation_dedupes_and_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # no network here: keep gloo on the loopback
    # fork: the children inherit the imported modules instead of importing torch again (seconds each).
    mp.start_processes(
        _worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world"] == 2
        assert rep["mean"] == pytest.approx(1.5)
        assert rep["gathered"] == [0, 10]
        assert rep["num_pos"] == pytest.approx(2.0)
        # Every rank gets rank 0's summary: the duplicate's wrong box did not count.
        assert rep["summary"]["AP"] == pytest.approx(1.0)
    assert reports[0]["duplicates"] == 1 and reports[0]["num_images"] == 3
    assert reports[1]["num_images"] == 0
