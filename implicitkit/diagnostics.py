"""Diagnostics of an equilibrium: the spectral radius of its Jacobian and the quality of a gradient estimate."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._compile import not_compiled
from ._tree import State, flatten, spec_of
from .functional import fixed_point
from .gradients import IFT, GradientEstimator
from .linearize import Linearization
from .solvers import Anderson, Solver
from .stats import SolverStats


# Outside torch.compile's graph: its vector-Jacobian products (torch.autograd.grad on a graph made here)
# would break it several times; run eagerly, it is one break and gives eager's numbers and graph.
@not_compiled
def spectral_radius(
    f: Callable[[State], State],
    z: State,
    *,
    n_iter: int = 100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate ``rho(J)``, the largest eigenvalue magnitude of ``J = df/dz`` at ``z``, per sample.

    Power iteration on ``J^T`` (which has the same eigenvalues) with vector-Jacobian products,
    ``v_{k+1} = v_k J / ||v_k J||``, from a Gaussian start; the estimate is the geometric mean of the growth
    factors ``||v_k J||`` over the second half of the iterations,

    ``rho ~ (prod_{k > n/2} ||v_k J||)^(2/n)``,

    which converges geometrically when the dominant eigenvalue is real and separated from the rest, and as
    ``1 / n_iter`` when it is a complex pair (where single growth factors oscillate). A fixed point is
    locally attracting for plain iteration when ``rho < 1``; the closer to 1, the slower the forward solve
    and the worse the truncated estimators (JFB, Neumann, Phantom). One evaluation of ``f`` and ``n_iter``
    VJPs; no dense Jacobian. Samples must not interact inside ``f``.

    Arguments:
        f: the map.
        z: the point (usually the detached fixed point), a tensor ``[B, ...]`` or a structured state.
        n_iter: number of power iterations.
        generator: source of the start vector; draws are made on its device.

    Returns:
        ``[B]`` estimates, without a graph.
    """
    if n_iter < 2:
        raise ValueError(f"n_iter must be at least 2, got {n_iter}.")
    # One graph of f at z, reused for every VJP. Plain autograd rather than torch.func keeps any cell
    # working, including ones built from custom autograd Functions (or containing a DEQ of their own).
    lin = Linearization(f, z)
    z_flat = flatten(z, lin.spec).detach()
    device = generator.device if generator is not None else z_flat.device
    v = torch.randn(z_flat.shape, generator=generator, device=device, dtype=z_flat.dtype).to(z_flat.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    tiny = torch.finfo(v.dtype).tiny
    log_growth = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    tail_start = n_iter // 2
    for k in range(n_iter):
        w = lin.vjp(v)
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(tiny)
        if k >= tail_start:
            log_growth = log_growth + norm.squeeze(1).log()
        v = w / norm
    return torch.exp(log_growth / (n_iter - tail_start))


@dataclass
class GradientAudit:
    """How an estimator's gradient compares with the exact implicit gradient on one batch.

    Attributes:
        cosine: cosine similarity of the two gradients (all audited tensors concatenated).
        relative_error: ``||g_est - g_exact|| / ||g_exact||``.
        descent: ``<g_est, g_exact> > 0``: a small step along ``-g_est`` lowers the loss.
        norm_ratio: ``||g_est|| / ||g_exact||``.
        forward: stats of the forward solve both gradients were taken at.
        adjoint: stats of the reference's adjoint solve.
        estimator: the audited estimator's repr.
    """

    cosine: float
    relative_error: float
    descent: bool
    norm_ratio: float
    forward: SolverStats
    adjoint: SolverStats | None
    estimator: str

    def __str__(self) -> str:
        return (
            f"{self.estimator}: cosine {self.cosine:.4f}, relative error {self.relative_error:.3g}, "
            f"norm ratio {self.norm_ratio:.3f}, descent {self.descent}"
        )


def gradient_audit(
    f: Callable[[State], State],
    z0: State,
    loss_fn: Callable[[State], Tensor],
    estimator: GradientEstimator,
    *,
    wrt: Sequence[Tensor],
    solver: Solver | None = None,
    reference: GradientEstimator | None = None,
) -> GradientAudit:
    """Compare ``estimator``'s gradient of a batch loss with the exact implicit gradient.

    With ``z* = f(z*)`` found from ``z0`` by ``solver``, the exact gradient is
    ``dL/dtheta = g (I - J)^-1 df/dtheta`` (``g = dL/dz*``), computed by ``reference``, an :class:`IFT`
    with a tight adjoint tolerance that raises if its adjoint solve fails. Both gradients are taken with
    respect to ``wrt`` at the same fixed point (the solver is deterministic and no perturbation is used),
    flattened and concatenated, then compared.

    Arguments:
        f: the map, with autograd to the tensors in ``wrt`` (for a :class:`~implicitkit.DEQ` pass
            ``lambda z: deq.cell(z, *inputs)`` and ``wrt=list(deq.parameters())``).
        z0: the starting state.
        loss_fn: maps the fixed point to a scalar loss over the batch.
        estimator: the estimator to audit.
        wrt: tensors (parameters, inputs) that require grad.
        solver: the forward solver; default ``Anderson(tol=1e-6, max_iter=200)`` (``tol=1e-10`` in float64).
        reference: the exact estimator; default ``IFT`` with an Anderson adjoint solve at the same tolerance.

    Returns:
        A :class:`GradientAudit`.
    """
    wrt = list(wrt)
    if not wrt or not all(t.requires_grad for t in wrt):
        raise ValueError("gradient_audit needs a non-empty wrt= of tensors that require grad.")
    dtype = flatten(z0, spec_of(z0)).dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    solver = solver if solver is not None else Anderson(tol=tol, max_iter=200)
    if reference is None:
        reference = IFT(Anderson(tol=tol, max_iter=500), on_failure="raise")
    exact, sol = _gradient(f, z0, loss_fn, reference, solver, wrt)
    estimate, _ = _gradient(f, z0, loss_fn, estimator, solver, wrt)
    exact, estimate = exact.double(), estimate.double()
    exact_norm, estimate_norm = exact.norm().item(), estimate.norm().item()
    inner = torch.dot(exact, estimate).item()
    return GradientAudit(
        cosine=inner / max(exact_norm * estimate_norm, 1e-300),
        relative_error=(estimate - exact).norm().item() / max(exact_norm, 1e-300),
        descent=inner > 0,
        norm_ratio=estimate_norm / exact_norm if exact_norm else math.inf,
        forward=sol.stats,
        adjoint=sol.backward_stats[-1] if sol.backward_stats else None,
        estimator=repr(estimator),
    )


def _gradient(f, z0, loss_fn, estimator, solver, wrt):
    """The flat gradient of ``loss_fn(z*)`` with respect to ``wrt`` under ``estimator``, and the solution."""
    with torch.enable_grad():
        sol = fixed_point(f, z0, solver=solver, gradient=estimator)
        loss = loss_fn(sol.value)
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    flat = [(torch.zeros_like(t) if g is None else g).reshape(-1) for g, t in zip(grads, wrt, strict=True)]
    return torch.cat(flat), sol
