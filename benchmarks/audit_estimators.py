"""Audit every gradient estimator against the exact implicit gradient on a trained DEQ classifier.

A DEQ on scikit-learn's bundled 8x8 digits: ``z = tanh(W z + E x)``, a linear head, cross-entropy. Each
estimator's gradient of a held-out batch's loss, with respect to every parameter, is compared with the exact
one (:func:`implicitkit.gradient_audit`) at four points: the initial weights, after training with IFT and
the Jacobian regulariser, after the same training without it, and the initial weights with ``W`` doubled
(a stiff equilibrium, spectral radius of ``J`` near 1, in float64). Cost is counted, not timed,
so that it does not depend on the machine's load: applications of the cell (forward, with and without a
graph) and vector-Jacobian products through it (backward) in one training step, and that step's peak
autograd-graph memory (:class:`implicitkit.GraphMemory`).

Run: ``.venv/bin/python benchmarks/audit_estimators.py``
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import implicitkit as ik

ESTIMATORS = {
    "IFT": lambda: ik.IFT(),
    "JFB": lambda: ik.JFB(),
    "Phantom(5, 0.5)": lambda: ik.Phantom(k=5, tau=0.5),
    "RAG(2)": lambda: ik.RAG(k=2),
    "Neumann(5)": lambda: ik.Neumann(k=5),
    "Neumann(20)": lambda: ik.Neumann(k=20),
    "Unrolled": lambda: ik.Unrolled(),
}


class _CountVJP(torch.autograd.Function):
    """Identity whose backward counts the vector-Jacobian products taken through the cell."""

    @staticmethod
    def forward(ctx, x, counts):
        ctx.counts = counts
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.counts["vjp"] += 1
        return grad, None


class DigitsDEQ(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Linear(64, hidden)
        self.w = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)
        self.counts = {"f": 0, "vjp": 0}

    def cell(self, z, x):
        self.counts["f"] += 1
        return _CountVJP.apply(torch.tanh(self.w(z) + x), self.counts)

    def solve(self, images, gradient, solver):
        x = self.embed(images)
        return ik.fixed_point(
            lambda z: self.cell(z, x), torch.zeros_like(x), solver=solver, gradient=gradient
        )


def load(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    # Copies, not views: a saved view keeps its whole base storage alive, which GraphMemory would count.
    return (x[:1400].clone(), y[:1400].clone()), (x[1400:1656].clone(), y[1400:1656].clone())


def train(model, data, epochs: int, solver, jac_weight: float) -> None:
    """Adam on cross-entropy plus ``jac_weight`` times the normalised Jacobian Frobenius norm at z*."""
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gradient = ik.IFT(ik.Anderson(tol=1e-5, max_iter=100), on_failure=ik.JFB())
    x, y = data
    for _ in range(epochs):
        for i in range(0, len(y), 100):
            images = x[i : i + 100]
            sol = model.solve(images, gradient, solver)
            loss = nn.functional.cross_entropy(model.head(sol.value), y[i : i + 100])
            if jac_weight:
                features = model.embed(images)
                loss = loss + jac_weight * ik.jacobian_frobenius(
                    lambda z, f=features: model.cell(z, f), sol.value, normalize=True
                )
            opt.zero_grad()
            loss.backward()
            opt.step()


def cost(model, images, labels, estimator, solver) -> tuple[int, int, int]:
    """Applications of f, VJPs through f and peak graph bytes of one training step (solve, loss, backward)."""
    model.zero_grad()
    model.counts.update(f=0, vjp=0)
    with ik.GraphMemory() as mem:
        z, _ = model.solve(images, estimator, solver)
        nn.functional.cross_entropy(model.head(z), labels).backward()
    return model.counts["f"], model.counts["vjp"], mem.peak_bytes


def audit_setting(name, model, batch, solver) -> None:
    images, labels = batch
    with torch.no_grad():
        x = model.embed(images)
        z_star, stats = ik.fixed_point(lambda z: model.cell(z, x), torch.zeros_like(x), solver=solver)
    rho = ik.spectral_radius(lambda z: model.cell(z, x), z_star, n_iter=200, generator=torch.Generator())
    print(
        f"\n{name}: spectral radius of J mean {rho.mean():.3f} max {rho.max():.3f}; forward "
        f"{stats.nstep.float().mean():.1f} steps (Anderson, tol {solver.tol:g})"
    )
    print("| estimator | cosine | relative error | descent | f calls | VJPs | peak graph KiB |")
    print("|---|---:|---:|:---:|---:|---:|---:|")
    params = list(model.parameters())
    for label, make in ESTIMATORS.items():
        with torch.enable_grad():
            audit = ik.gradient_audit(
                lambda z: model.cell(z, model.embed(images)),
                torch.zeros_like(x),
                lambda z: nn.functional.cross_entropy(model.head(z), labels),
                make(),
                wrt=params,
                solver=solver,
            )
        calls, vjps, peak = cost(model, images, labels, make(), solver)
        descent = "yes" if audit.descent else "no"
        print(
            f"| {label} | {audit.cosine:.4f} | {audit.relative_error:.3g} | {descent} | {calls} | {vjps} | "
            f"{peak / 1024:.0f} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--jac-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train_data, test_batch = load(args.seed)
    solver = ik.Anderson(tol=1e-5, max_iter=100)
    model = DigitsDEQ(args.hidden)
    audit_setting("initial weights", model, test_batch, solver)

    trained = {}
    for jac_weight in (args.jac_weight, 0.0):
        torch.manual_seed(args.seed)
        model = trained[jac_weight] = DigitsDEQ(args.hidden)
        train(model, train_data, args.epochs, solver, jac_weight)
        with torch.no_grad():
            z, _ = model.solve(test_batch[0], ik.IFT(), solver)
            accuracy = (model.head(z).argmax(1) == test_batch[1]).float().mean()
        name = f"trained {args.epochs} epochs, Jacobian weight {jac_weight} (test accuracy {accuracy:.3f})"
        audit_setting(name, model, test_batch, solver)

    # A stiff equilibrium: the initial weights with W doubled (mean spectral radius near 1), in float64 so
    # that the reference adjoint solve can reach a tight tolerance.
    torch.manual_seed(args.seed)
    model = DigitsDEQ(args.hidden).double()
    with torch.no_grad():
        model.w.weight.mul_(2.0)
    stiff_batch = (test_batch[0].double(), test_batch[1])
    audit_setting(
        "initial weights with W doubled, float64 (stiff)",
        model,
        stiff_batch,
        ik.Anderson(tol=1e-8, max_iter=150),
    )


if __name__ == "__main__":
    main()
