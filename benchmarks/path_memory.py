"""Peak autograd-graph memory of path supervision: one big graph versus one branch at a time.

A DEQDet-shaped toy: a shared encoder makes features ``[B, N, C]``, a refinement cell is iterated 20 times
without a graph, and RAG(2) branches are taken after steps (1, 3, 6, 9, 12, 20)[:n]. "one graph" sums every
loss and back-propagates once; "per branch" back-propagates each branch's loss as soon as it is computed,
against :class:`implicitkit.SharedInputs` copies of the features, then sends their gradient to the encoder
once. Memory is the peak of bytes saved for backward (:class:`implicitkit.GraphMemory`), exact and
deterministic.

Run: ``.venv/bin/python benchmarks/path_memory.py``
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import implicitkit as ik

STEPS = (1, 3, 6, 9, 12, 20)


class Cell(nn.Module):
    """``z <- LayerNorm(z + MLP(z + x))`` over the channels of every query."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.ReLU(), nn.Linear(2 * channels, channels)
        )
        self.norm = nn.LayerNorm(channels)

    def forward(self, z, x):
        return self.norm(z + self.mlp(z + x))


def training_step(encoder, deq, head, images, n_branches: int, per_branch: bool) -> int:
    """One training step's peak graph bytes."""

    def loss(z):
        return head(z).square().mean()

    steps = STEPS[:n_branches]
    with ik.GraphMemory() as mem:
        features = encoder(images)
        if per_branch:
            shared = ik.SharedInputs(features)
            sol = deq(torch.zeros_like(features), *shared.inputs, capture=steps)
            sol.path.backward(loss)
            loss(sol.value).backward()
            shared.backward()
        else:
            sol = deq(torch.zeros_like(features), features, capture=steps)
            (loss(sol.value) + sum(loss(z) for z in sol.path)).backward()
        del sol
    if mem.live_bytes:
        raise RuntimeError(f"{mem.live_bytes} bytes of graph outlived the backward passes")
    return mem.peak_bytes


def main(argv: list[str] | None = None) -> dict[int, tuple[int, int]]:
    """Print the table; return ``{branches: (one-graph peak bytes, per-branch peak bytes)}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--channels", type=int, default=256)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    c = args.channels
    encoder = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c))
    deq = ik.DEQ(Cell(c), solver=ik.FixedPointIteration(tol=None, max_iter=20), gradient=ik.RAG(2))
    head = nn.Linear(c, 4)
    images = torch.randn(args.batch, args.queries, c)

    print(f"B={args.batch}, N={args.queries}, C={c}, RAG(2) branches after steps {STEPS}, 20 solver steps")
    print("| branches | one graph: peak MiB | per branch: peak MiB |")
    print("|---:|---:|---:|")
    table = {}
    for n in (1, 2, 3, 6):
        one = training_step(encoder, deq, head, images, n, per_branch=False)
        per = training_step(encoder, deq, head, images, n, per_branch=True)
        table[n] = (one, per)
        print(f"| {n} | {one / 2**20:.2f} | {per / 2**20:.2f} |")
    return table


if __name__ == "__main__":
    main()
