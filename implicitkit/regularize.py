"""Jacobian regularisation: a differentiable Hutchinson estimate of ``||df/dz||_F^2`` at a point."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._compile import not_compiled
from ._settings import as_count
from ._tree import State, flatten
from .linearize import Linearization

_REDUCTIONS = ("mean", "sum", "none")


# Outside torch.compile's graph: its vector-Jacobian products (torch.autograd.grad on a graph made here)
# would break it several times; run eagerly, it is one break and gives eager's numbers and graph.
@not_compiled
def jacobian_frobenius(
    f: Callable[[State], State],
    z: State,
    *,
    n_samples: int = 1,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    normalize: bool = False,
) -> Tensor:
    """Hutchinson's estimate of the squared Frobenius norm of ``J = df/dz`` at ``z``, per sample.

    ``||J||_F^2 = E_eps ||eps^T J||^2``,  ``eps ~ N(0, I)``,

    averaged over ``n_samples`` draws, each one vector-Jacobian product. The estimate is unbiased, and so is
    its gradient with respect to ``f``'s parameters and inputs: added to the loss it pushes the equilibrium
    towards a contraction, which keeps the solver's step count and the estimators' error low. ``z`` is
    detached: the term trains ``f`` through ``J``, not the point it is evaluated at (pass the detached
    fixed point). Under ``torch.no_grad()`` the estimate is returned without a graph, for monitoring.

    Arguments:
        f: the map, with autograd to its parameters and inputs; samples must not interact.
        z: the point, a tensor ``[B, ...]`` or a structured state.
        n_samples: number of probe vectors; the variance falls as ``1 / n_samples``.
        generator: source of the probes, for reproducible estimates; draws are made on its device.
        reduction: ``"mean"`` over the batch (a loss term), ``"sum"``, or ``"none"`` for the ``[B]`` values.
        normalize: divide by the state's per-sample size ``D``, the mean squared entry of ``J`` times ``D``
            (a scale that does not grow with the state's size).

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``.

    Reference: Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989; Bai, Koltun &
    Kolter, "Stabilizing equilibrium models by Jacobian regularization", ICML 2021.
    """
    n_samples = as_count("n_samples", n_samples)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
    create_graph = torch.is_grad_enabled()
    lin = Linearization(f, z)
    dtype = torch.promote_types(lin.z_leaves[0].dtype, torch.float32)
    total = lin.z_leaves[0].new_zeros(lin.spec.batch_size, dtype=dtype)
    for i in range(n_samples if lin.depends_on_z else 0):  # no output depends on z: J = 0
        probe = _gaussian(flatten(z, lin.spec), generator)
        vjp = lin.vjp(probe, create_graph=create_graph, retain_graph=create_graph or i < n_samples - 1)
        total = total + vjp.to(dtype).square().sum(dim=1)
    estimate = total / n_samples
    if normalize:
        estimate = estimate / sum(lin.spec.sizes)
    if reduction == "mean":
        return estimate.mean()
    if reduction == "sum":
        return estimate.sum()
    return estimate


def _gaussian(like: Tensor, generator: torch.Generator | None) -> Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
