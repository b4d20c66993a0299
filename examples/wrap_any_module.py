"""Wrap an ordinary ``nn.Module`` as a deep-equilibrium layer and train a digits classifier with it.

The data are scikit-learn's bundled UCI handwritten digits (1797 real 8x8 images, 10 classes). The hidden
state is the fixed point ``z* = f(z*, x)`` of a small MLP cell, found by Anderson acceleration; the gradient
is the exact implicit one (IFT). Runs in well under a minute on two CPU cores.

    python examples/wrap_any_module.py [--gradient ift|jfb|phantom|rag|neumann] [--epochs 12]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import implicitkit as ik

GRADIENTS = {
    # Samples whose adjoint solve does not converge fall back to JFB; the backward stats say how many.
    "ift": lambda: ik.IFT(ik.Anderson(tol=1e-4, max_iter=40), on_failure=ik.JFB()),
    "jfb": ik.JFB,
    "phantom": lambda: ik.Phantom(k=5, tau=0.5),
    "rag": lambda: ik.RAG(k=2),
    "neumann": lambda: ik.Neumann(k=5),
}


class MLPCell(nn.Module):
    """``f(z, x) = LayerNorm(z + relu(W2 relu(W1 z + x)))``: an ordinary residual block, nothing DEQ-specific."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, hidden)
        self.outer = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():  # start close to a contraction so the first solves converge
            self.outer.weight.mul_(0.3)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(z + torch.relu(self.outer(torch.relu(self.inner(z) + x))))


class DEQClassifier(nn.Module):
    def __init__(
        self, width: int = 64, hidden: int = 128, gradient: ik.GradientEstimator | None = None
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, hidden), nn.LayerNorm(hidden))
        self.deq = ik.DEQ(
            MLPCell(width, hidden),
            # Failures are counted, not warned of: each epoch's line says how many samples reached tol
            # (few at first, from random weights; nearly all once the cell has trained).
            solver=ik.Anderson(m=5, tol=1e-4, max_iter=30, stop_mode="rel", on_failure="report"),
            gradient=gradient or ik.IFT(),
        )
        self.head = nn.Linear(width, 10)
        self.width = width

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ik.Solution]:
        x = self.embed(images)
        solution = self.deq(x.new_zeros(len(x), self.width), x)
        return self.head(solution.value), solution


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        range(len(labels)), test_size=0.2, random_state=seed, stratify=labels
    )
    mean, std = images[idx_train].mean(0), images[idx_train].std(0) + 0.1
    images = (images - mean) / std
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


@torch.no_grad()
def evaluate(
    model: DEQClassifier, images: torch.Tensor, labels: torch.Tensor
) -> tuple[float, ik.SolverStats]:
    model.eval()
    logits, solution = model(images)
    return (logits.argmax(1) == labels).float().mean().item(), solution.stats


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gradient", choices=sorted(GRADIENTS), default="ift")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    # A 64-wide cell is far too small for intra-op parallelism to pay; extra threads only spin-wait.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    model = DEQClassifier(gradient=GRADIENTS[args.gradient]())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * -(-len(x_train) // args.batch_size)
    )
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; gradient {model.deq.gradient!r}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train))
        losses, steps, converged, backward_steps, fallbacks = [], [], [], [], 0
        for batch in order.split(args.batch_size):
            logits, solution = model(x_train[batch])
            loss = nn.functional.cross_entropy(logits, y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            steps.append(solution.stats.nstep.float().mean().item())
            converged.append(solution.stats.converged.float().mean().item())
            for adjoint in solution.backward_stats:  # filled by IFT's backward solve
                backward_steps.append(adjoint.nstep.float().mean().item())
                fallbacks += int(adjoint.fell_back.sum())
        accuracy, test_stats = evaluate(model, x_test, y_test)
        print(
            f"epoch {epoch:2d}  loss {sum(losses) / len(losses):.3f}  forward steps {sum(steps) / len(steps):5.1f}"
            + f" ({100 * sum(converged) / len(converged):3.0f}% at tol)"
            + (
                f"  backward steps {sum(backward_steps) / len(backward_steps):5.1f} ({fallbacks} fell back)"
                if backward_steps
                else ""
            )
            + f"  test acc {accuracy:.3f}  [{time.perf_counter() - start:5.1f}s]"
        )
    print(f"test solve: {test_stats.summary()}")
    print(f"test accuracy {accuracy:.4f} in {time.perf_counter() - start:.1f}s")
    return accuracy


if __name__ == "__main__":
    main()
