"""Branch-wise training: the same losses and gradients as one graph, under AMP, clipping, resume and DDP."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from det_engine_toy import random_batch

from implicitkit_det.data import DetectionBatch
from implicitkit_det.engine import (
    build_optimizer,
    cleanup_distributed,
    init_distributed,
    load_checkpoint,
    save_checkpoint,
    train_one_epoch,
    trains_branchwise,
    wrap_ddp,
)
from implicitkit_det.models import RAP, build_model
from implicitkit_det.models.detector import BranchwiseLosses

CPU = torch.device("cpu")
CLASSES = 10


def tiny(config: str = "deqdet_tiny", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = build_model(config, CLASSES, num_queries=6, backbone_norm="frozen", **overrides)
    if hasattr(model, "perturbation") and config == "deqdet_tiny":
        # Every perturbation on, from its own generator: both runs draw the same noise.
        model.perturbation = RAP(1.0, 0.1, 1.0, 4.0, generator=torch.Generator().manual_seed(5))
    return model


def batches(n: int, seed: int = 0, batch: int = 2) -> list[DetectionBatch]:
    gen = torch.Generator().manual_seed(seed)
    return [random_batch(gen, batch=batch, size=64, classes=CLASSES) for _ in range(n)]


class GradSpy:
    """Records every parameter's gradient when ``optimizer.step`` is called (after unscaling, clipping)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.grads: list[list[torch.Tensor | None]] = []
        step = optimizer.step

        def spy(*args, **kwargs):
            self.grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
            return step(*args, **kwargs)

        optimizer.step = spy  # type: ignore[method-assign]


def train(model, data, *, lr: float = 1e-3, **kwargs):
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    spy = GradSpy(model, opt)
    stats = train_one_epoch(model, data, opt, device=CPU, epoch=0, print_freq=0, **kwargs)
    return stats, spy.grads


def assert_grads_close(got, want, rtol: float, what: str) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None), what
        if w is not None:
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * float(w.abs().max()), msg=what)


@pytest.mark.parametrize(
    "config", ["deqdet_tiny", "deq_sparse_rcnn_tiny", "adamixer_tiny", "sparse_rcnn_tiny"]
)
def test_branchwise_forward_equals_one_graph(config, float64):
    (data,) = batches(1)
    stages = {} if config.startswith("deq") else {"num_stages": 2}  # the DEQs' one layer has no stages
    want_model = tiny(config, seed=3, **stages)
    want = want_model(data.images, data.targets, mask=data.mask)
    want["loss"].backward()
    got_model = tiny(config, seed=3, **stages)
    result = got_model(data.images, data.targets, mask=data.mask, branchwise=True)
    assert isinstance(result, BranchwiseLosses)
    got, pending = result.losses, result.pending
    assert pending.requires_grad and pending.item() == 0.0
    # Nothing reached the backbone yet: its gradient travels in the pending backward.
    assert all(p.grad is None for p in got_model.parameters())
    pending.backward()
    assert list(got) == list(want)  # the same entries in the same order, with the same numbers
    for key, value in want.items():
        assert torch.equal(got[key], value.detach()), key
        assert not got[key].requires_grad
    for (name, p), q in zip(want_model.named_parameters(), got_model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12 * float(p.grad.abs().max()))


def test_forward_backward_and_loss_scale(float64):
    (data,) = batches(1)
    want_model = tiny(seed=1)
    (4.0 * want_model(data.images, data.targets, mask=data.mask)["loss"]).backward()
    got_model = tiny(seed=1)
    got = got_model.forward_backward(data.images, data.targets, mask=data.mask, loss_scale=4.0)
    assert isinstance(got, dict) and not got["loss"].requires_grad
    for p, q in zip(want_model.parameters(), got_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12 * float(p.grad.abs().max()))


def test_the_engine_trains_branchwise_by_default_with_the_same_steps(float64, monkeypatch):
    data = batches(2)
    calls = []
    model = tiny()
    assert trains_branchwise(model) and not trains_branchwise(torch.nn.Linear(1, 1))
    forward = model.forward
    monkeypatch.setattr(
        model, "forward", lambda *a, **k: calls.append(k.get("branchwise")) or forward(*a, **k)
    )
    got_stats, got = train(model, data)
    assert calls == [True, True]
    want_stats, want = train(tiny(), data, branchwise=False)
    assert got_stats.keys() == want_stats.keys() and len(got) == len(want) == 2
    # Only the first step is compared: the second starts from weights that differ by rounding, which at
    # initialisation (all queries' boxes alike, matching costs nearly tied) can change a match.
    assert_grads_close(got[0], want[0], 1e-9, "engine step")


def test_the_logged_losses_are_the_same_numbers():
    got, _ = train(tiny(), batches(1))
    want, _ = train(tiny(), batches(1), branchwise=False)
    assert got.keys() == want.keys()
    assert {k for k in got if k.startswith("rag_s") and k.endswith("_loss")} == {
        f"rag_s{s}_loss" for s in (1, 3, 6, 9, 12, 20)
    }
    for key in want:
        if key not in ("time_s", "grad_norm"):
            assert got[key] == want[key], key
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def test_clipping_acts_on_the_total_gradient():
    data = batches(1)
    want_stats, want = train(tiny(), data, branchwise=False, clip_max_norm=1e-3)
    got_stats, got = train(tiny(), data, clip_max_norm=1e-3)
    assert got_stats["grad_norm"] > 1e-3  # reported before clipping
    assert got_stats["grad_norm"] == pytest.approx(want_stats["grad_norm"], rel=1e-4)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in got[0] if g is not None]))
    assert norm <= 1e-3 * (1 + 1e-4)
    assert_grads_close(got[0], want[0], 1e-3, "clipped")


class CountingScaler(torch.amp.GradScaler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaled = 0

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)


@pytest.mark.parametrize("stacked", [False, True])
def test_grad_scaler_scales_every_branch_and_unscales_before_clipping(stacked):
    data = batches(1)
    _, want = train(tiny(stack_branches=stacked), data, clip_max_norm=0.5)
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()
    stats, got = train(tiny(stack_branches=stacked), data, clip_max_norm=0.5, scaler=scaler)
    # The init group, then each of the six RAG branches; stacked, one group of them all.
    assert scaler.scaled == (1 if stacked else 1 + 6)
    assert scaler.get_scale() == 2.0**10  # no overflow: the step was taken, the scale kept
    # Scaling by a power of two commutes with the backward: the unscaled, clipped gradients are the same.
    assert_grads_close(got[0], want[0], 1e-5, "scaled")
    assert torch.isfinite(torch.tensor(stats["loss"]))


def test_bf16_autocast_branchwise():
    data = batches(1)
    want_stats, want = train(tiny(), data, amp=True, branchwise=False)
    got_stats, got = train(tiny(), data, amp=True)
    assert got_stats["loss"] == pytest.approx(want_stats["loss"], rel=1e-6)
    assert all(torch.isfinite(g).all() for g in got[0] if g is not None)
    # bfloat16 gradients summed in another order: close, not equal.
    assert_grads_close(got[0], want[0], 5e-2, "bf16")


def test_resume_continues_branchwise_training_exactly(tmp_path):
    data = batches(3)
    model = tiny()
    model.perturbation = RAP(0.5, 0.1, 0.5, 4.0)  # draws from the global generator saved in the checkpoint
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    train_one_epoch(model, data[:1], opt, device=CPU, epoch=0, print_freq=0)
    path = save_checkpoint(
        tmp_path / "checkpoint.pth", model=model, optimizer=opt, scheduler=None, epoch=0, config={}, args={}
    )
    reference = train_one_epoch(model, data[1:], opt, device=CPU, epoch=1, print_freq=0)

    model2 = tiny(seed=7)
    model2.perturbation = RAP(0.5, 0.1, 0.5, 4.0)
    opt2 = build_optimizer(model2, lr=1e-3, weight_decay=0.01)
    load_checkpoint(path, model=model2, optimizer=opt2, restore_rng=True)
    resumed = train_one_epoch(model2, data[1:], opt2, device=CPU, epoch=1, print_freq=0)
    assert resumed["loss"] == reference["loss"]
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


# -- two gloo processes against one ------------------------------------------------------------------------
def ddp_model():
    model = tiny()
    model.perturbation = None  # each rank would draw its own noise
    return model


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    env = {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update({k: str(v) for k, v in env.items()})
    info = init_distributed("cpu")
    try:
        report = {}
        for unused in (False, True):
            model = ddp_model()
            ddp = wrap_ddp(model, info, find_unused_parameters=unused)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            spy = GradSpy(model, opt)
            shard = [
                DetectionBatch(b.images[rank : rank + 1], b.mask[rank : rank + 1], b.targets[rank : rank + 1])
                for b in batches(2)
            ]
            stats = train_one_epoch(ddp, shard, opt, device=info.device, epoch=0, print_freq=0)
            report[unused] = {"loss": stats["loss"], "grads": spy.grads}
        torch.save(report, Path(out_dir, f"rank{rank}.pt"))
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
def test_two_processes_branchwise_equal_one_with_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.start_processes(
        _ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish within 180 s")
    model = ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    spy = GradSpy(model, opt)
    want = train_one_epoch(model, batches(2), opt, device=CPU, epoch=0, print_freq=0)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for unused in (False, True):
        for report in reports:
            got = report[unused]
            # The losses are normalised by the number of targets averaged over processes: the same total.
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            assert len(got["grads"]) == len(spy.grads) == 2
            # The first step against one process (the second starts from weights equal up to rounding,
            # where a nearly tied match can flip); every step equal across the two replicas.
            for g, w in zip(got["grads"][0], spy.grads[0], strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5 * float(w.abs().max()) + 1e-9)
        for step0, step1 in zip(reports[0][unused]["grads"], reports[1][unused]["grads"], strict=True):
            for g0, g1 in zip(step0, step1, strict=True):
                torch.testing.assert_close(g0, g1, rtol=0, atol=0)
