"""Two gloo processes started the way torchrun starts them: DDP training steps keep the replicas equal."""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from det_engine_toy import ToyDetector, random_batch

from implicitkit_det import cli
from implicitkit_det.engine import (
    NonFiniteLossError,
    build_optimizer,
    build_sampler,
    cleanup_distributed,
    init_distributed,
    train_one_epoch,
    wrap_ddp,
)
from implicitkit_det.evaluation import STAT_NAMES


class PoisonOnRank1(torch.nn.Module):
    def __init__(self, model, rank):
        super().__init__()
        self.model, self.rank = model, rank

    def forward(self, images, targets, mask=None):
        losses = self.model(images, targets, mask=mask)
        if self.rank == 1:
            losses["loss"] = losses["loss"] * float("inf")
        return losses


def _worker(rank: int, port: int, out_dir: str) -> None:
    env = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    # A forked child must not enter OpenMP regions of the parent's thread pool (they can deadlock), so it
    # runs single-threaded, as DataLoader workers do.
    torch.set_num_threads(1)
    os.environ.update({k: str(v) for k, v in env.items()})
    info = init_distributed("cpu")
    try:
        torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
        model = ToyDetector()
        if rank == 1:
            with torch.no_grad():
                model.cls.weight.add_(1.0)  # DDP must overwrite this with rank 0's weights
        opt = build_optimizer(model, lr=1e-2, weight_decay=0.01)
        ddp = wrap_ddp(model, info)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        stats = train_one_epoch(
            ddp, [random_batch(gen) for _ in range(2)], opt, device=info.device, epoch=0, print_freq=0
        )
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        sampler = build_sampler(list(range(5)), shuffle=True, seed=0)
        sampler.set_epoch(0)
        report = {
            "info": [info.rank, info.world_size, info.local_rank, str(info.device)],
            "backend": dist.get_backend(),
            "stats": stats,
            "params": flat.tolist(),
            "share": list(sampler),
        }
        try:
            train_one_epoch(
                PoisonOnRank1(ddp, rank), [random_batch(gen)], opt, device=info.device, epoch=5, print_freq=0
            )
        except NonFiniteLossError as err:
            report["error"] = str(err)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
def test_ddp_steps_from_torchrun_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children inherit the imported modules instead of importing torch again (seconds each). A
    # deadline turns a hang into a failure instead of a stuck test run.
    ctx = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish within 120 s")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["info"] == [0, 2, 0, "cpu"] and r1["info"] == [1, 2, 1, "cpu"] and r0["backend"] == "gloo"
    # Averaged gradients: both replicas take the same steps and report the same (process-averaged) losses.
    assert r0["params"] == pytest.approx(r1["params"], abs=1e-6)
    assert r0["stats"]["loss"] == pytest.approx(r1["stats"]["loss"])
    # The samplers split the data: 5 items -> 3 each, the first item repeated to even them out.
    assert len(r0["share"]) == len(r1["share"]) == 3
    assert sorted(set(r0["share"]) | set(r1["share"])) == [0, 1, 2, 3, 4]
    # A non-finite loss on one rank stops both, at the same iteration.
    for r in (r0, r1):
        assert "epoch 5, iteration 0" in r["error"] and "loss inf" in r["error"]


def _evaluate_module():
    """The module `implicitkit_det.engine.evaluate` (the package's `evaluate` is the function of that name)."""
    return importlib.import_module("implicitkit_det.engine.evaluate")


def _recording_batches(into: list) -> object:
    """``forward_eval`` that also notes each evaluation batch: its image ids and padded image shape."""
    evaluate = _evaluate_module()

    original = evaluate.forward_eval

    def recording(model, batch):
        into.append([[t["image_id"] for t in batch.targets], list(batch.images.shape)])
        return original(model, batch)

    return recording


def _cli_worker(rank: int, port: int, root: str, out_dir: str) -> None:
    from test_det_engine_cli import FAST

    evaluate = _evaluate_module()

    batches: list = []
    evaluate.forward_eval = _recording_batches(batches)
    torch.set_num_threads(1)
    env = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()})
    stats = cli.main(
        [
            *FAST,
            "--data-root",
            root,
            "--epochs",
            "1",
            "--output-dir",
            out_dir,
            "--device",
            "cpu",
            "--eval-batch-size",
            "2",
        ]
    )
    Path(out_dir, f"stats{rank}.json").write_text(json.dumps({**stats, "batches": batches}))


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
def test_cli_under_two_processes(tiny_digits, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path / "run"
    ctx = mp.start_processes(
        _cli_worker,
        args=(_free_port(), str(tiny_digits.root), str(out)),
        nprocs=2,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two CLI processes did not finish within 120 s")
    s0, s1 = (json.loads((out / f"stats{r}.json").read_text()) for r in (0, 1))
    for key in (*STAT_NAMES, "per_class_AP"):  # every rank receives rank 0's summary
        assert s0[key] == s1[key]
    # 5 val images in batches of 2, dealt [0, 1], [4] and [2, 3]: each image scored once.
    assert s0["images"] == s1["images"] == 5
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written by rank 0 only
    record = json.loads(lines[0])
    assert record["train"]["iters"] == 2 and record["eval"]["AP"] == s0["AP"]
    assert (out / "checkpoint_last.pth").is_file()
    # The same checkpoint scored by one process: the same batches, padded alike, so the same AP (a strided
    # share of the images put them in other batches, padded otherwise, and moved the AP).
    evaluate = _evaluate_module()

    batches: list = []
    monkeypatch.setattr(evaluate, "forward_eval", _recording_batches(batches))
    alone = cli.main(["eval", "--resume", str(out), "--eval-batch-size", "2", "--device", "cpu"])
    assert len(batches) == 3 and sorted(s0["batches"] + s1["batches"]) == sorted(batches)
    for key in (*STAT_NAMES, "per_class_AP"):
        assert alone[key] == s0[key], key


def test_evaluation_batches_are_one_process_batches_dealt_in_turn(monkeypatch):
    import implicitkit_det.engine.process_group as pg

    def share(rank, world, size=7, batch=2):
        monkeypatch.setattr(pg, "get_rank", lambda: rank)
        monkeypatch.setattr(pg, "get_world_size", lambda: world)
        batches = pg.DealtBatches(size, batch)
        assert len(batches) == len(list(batches))
        return list(batches)

    assert share(0, 1) == [[0, 1], [2, 3], [4, 5], [6]]
    assert share(0, 3) == [[0, 1], [6]] and share(1, 3) == [[2, 3]] and share(2, 3) == [[4, 5]]
    assert share(4, 5) == []  # more processes than batches: nothing to do, no repeats
    with pytest.raises(ValueError, match="batch_size"):
        pg.DealtBatches(3, 0)


def test_trained_batch_norms_are_counted_for_the_per_process_note():
    """Under DDP a trained BatchNorm normalises each process's own images: the run names how many there are.
    Frozen statistics (the pre-trained presets') and frozen stages do not count."""
    from implicitkit_det.engine.process_group import per_process_batch_norms
    from implicitkit_det.models import build_model

    assert per_process_batch_norms(build_model("deqdet_tiny", 3)) == 12  # ResNet-10 from scratch
    assert per_process_batch_norms(build_model("deqdet_tiny", 3, frozen_stages=2)) == 6
    assert per_process_batch_norms(build_model("deqdet_tiny", 3, backbone_norm="frozen_stats")) == 0
    assert per_process_batch_norms(build_model("deqdet_tiny", 3, backbone_norm="frozen")) == 0
