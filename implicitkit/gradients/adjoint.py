"""An autograd function whose backward maps ``g = dL/dz*`` to an adjoint ``u`` computed with VJPs of f.

The forward pass returns ``z*`` unchanged; the function's inputs are the leaves of ``f(z*)`` computed with a
graph to the parameters and inputs. Its backward hands ``u`` to those leaves, so autograd finishes with
``u df/dtheta`` and ``u df/dx``. No hook is registered on any module or parameter, which keeps this safe
under DistributedDataParallel and with modules that appear twice in a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._tree import StateSpec, check_same_structure, flatten, leaves_of, spec_of, unflatten

AdjointRule = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]


class _AdjointProblem:
    """What the backward pass needs: ``f(z)`` with its graph, the leaf ``z`` and the rule for ``u``."""

    def __init__(self, fz_leaves: list[Tensor], z_leaves: list[Tensor], spec: StateSpec, rule: AdjointRule):
        self.fz_leaves, self.z_leaves, self.spec, self.rule = fz_leaves, z_leaves, spec, rule

    def vjp(self, u_flat: Tensor) -> Tensor:
        """``u J`` for flat ``u`` ``[B, D]``, as one reverse pass through ``f`` (graph kept for reuse)."""
        u_leaves, _ = leaves_of(unflatten(u_flat, self.spec))
        # A leaf of f(z) without a graph (a detached box, a constant) contributes nothing to u J.
        pairs = [
            (fz, u.to(fz.dtype)) for u, fz in zip(u_leaves, self.fz_leaves, strict=True) if fz.requires_grad
        ]
        if not pairs:
            return torch.zeros_like(u_flat)
        outputs, cotangents = zip(*pairs, strict=True)
        grads = torch.autograd.grad(outputs, self.z_leaves, cotangents, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, self.z_leaves, strict=True)]
        return flatten(self.spec.treespec.unflatten(grads), self.spec)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: _AdjointProblem, z_star_leaves: list[Tensor], *fz_leaves: Tensor):
        ctx.problem = problem
        return tuple(z.clone() for z in z_star_leaves)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):
        problem: _AdjointProblem = ctx.problem
        grads = [
            torch.zeros_like(z) if g is None else g for g, z in zip(grads, problem.z_leaves, strict=True)
        ]
        g_flat = flatten(problem.spec.treespec.unflatten(grads), problem.spec)
        with torch.enable_grad():
            u_flat = problem.rule(g_flat, problem.vjp)
        u_leaves, _ = leaves_of(unflatten(u_flat, problem.spec))
        return (
            None,
            None,
            *(
                u.to(fz.dtype) if fz.requires_grad else None
                for u, fz in zip(u_leaves, problem.fz_leaves, strict=True)
            ),
        )


def attach_adjoint(f: Callable, z_star, rule: AdjointRule):
    """Return ``z_star`` whose backward applies ``rule(g, vjp) -> u`` and then backpropagates ``u`` through f.

    Arguments:
        f: the map, with a graph to its parameters and inputs.
        z_star: the detached fixed point (any supported structure).
        rule: computes the flat adjoint ``u`` from the flat ``g`` and a flat VJP ``v -> v J``.
    """
    spec = spec_of(z_star)
    z_in = _tree_detach_requires_grad(z_star)
    z_leaves, _ = leaves_of(z_in)
    fz = f(z_in)
    fz_leaves, fz_treespec = leaves_of(fz)
    check_same_structure(spec, fz_treespec, fz_leaves)
    problem = _AdjointProblem(fz_leaves, z_leaves, spec, rule)
    z_star_leaves, _ = leaves_of(z_star)
    out = _Adjoint.apply(problem, z_star_leaves, *fz_leaves)
    return spec.treespec.unflatten(list(out))


def _tree_detach_requires_grad(state):
    leaves, treespec = leaves_of(state)
    return treespec.unflatten([x.detach().requires_grad_() for x in leaves])
