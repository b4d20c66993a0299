"""``DistributedDataParallel(ik.DEQ(...))`` with two gloo processes equals one process on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import implicitkit as ik


class Cell(nn.Module):
    def __init__(self, with_unused: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if with_unused:
            self.unused = nn.Linear(4, 4)  # never called: what find_unused_parameters=True is for

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin(z) + x)


def make_deq(gradient_name: str, with_unused: bool) -> ik.DEQ:
    torch.manual_seed(0)
    gradient = {"IFT": ik.IFT(ik.Anderson(tol=1e-10, max_iter=60)), "RAG": ik.RAG(2)}[gradient_name]
    return ik.DEQ(Cell(with_unused).double(), solver=ik.Anderson(tol=1e-10, max_iter=60), gradient=gradient)


def batch() -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def loss_of(deq, x) -> torch.Tensor:
    z, _ = deq(torch.zeros_like(x), x)
    return z.square().sum()


def _worker(rank, world, init_file, gradient_name, find_unused, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        deq = make_deq(gradient_name, with_unused=find_unused)
        ddp = nn.parallel.DistributedDataParallel(deq, find_unused_parameters=find_unused)
        x = batch().chunk(world)[rank]
        for _ in range(2):  # a second iteration catches "marked ready twice" across iterations
            ddp.zero_grad()
            (loss_of(ddp, x) * world).backward()  # DDP averages; the reference sums the whole batch
        if rank == 0:
            grads = {name: p.grad for name, p in ddp.module.named_parameters() if p.grad is not None}
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(
    not dist.is_available() or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed and fork",
)
@pytest.mark.parametrize("find_unused", [False, True])
@pytest.mark.parametrize("gradient_name", ["IFT", "RAG"])
def test_ddp_two_processes_equal_one(tmp_path, monkeypatch, gradient_name, find_unused):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # no network here: keep gloo on the loopback
    reference = make_deq(gradient_name, with_unused=find_unused)
    loss_of(reference, batch()).backward()
    out = tmp_path / "grads.pt"
    # fork: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "init"), gradient_name, find_unused, str(out)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    grads = torch.load(out)
    assert set(grads) == {"cell.lin.weight", "cell.lin.bias"}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(reference.named_parameters())[name].grad, atol=1e-9, rtol=1e-7)
