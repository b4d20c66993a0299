"""Exact second derivatives through an adjoint: the fixed point made differentiable twice.

The first-order gradient is ``G(theta) = u df/dtheta (z*, theta)`` with ``u = g (I - J)^-1``. Its derivative
needs ``u`` differentiated (through ``g``, ``theta`` and ``z*``) and ``z*``'s own derivative wherever ``z*``
appears. Two nodes give both, at the price of a second graph of ``f`` at ``z*``:

- ``z1 = Inner(f(sg(z*)))`` equals ``z*``; its backward maps a cotangent ``c`` on ``z*`` to the parameters by
  the estimator's own adjoint, ``(c (I - J)^-1) df/dtheta``: ``z1`` has ``z*``'s first derivative.
- ``out = Outer(z1, f(z1))`` equals ``z*``; its backward hands ``u`` to ``f(z1)``, so autograd finishes with
  ``u df/dtheta`` at ``z1``, and ``-u J`` to ``z1``, which cancels ``u``'s flow through ``f`` into ``z1``. Under
  ``create_graph=True`` ``u`` is built differentiably (for IFT the adjoint fixed point ``u = u J + g`` is
  attached implicitly itself, its backward solving the transposed system ``(I - J) y = w``), and every ``J``
  and ``df/dtheta`` in the first-order graph is taken at ``z1``, so the second pass differentiates through
  ``z*`` correctly.

In a plain first-order backward ``Inner`` receives nothing that counts (the cancelled flow) and skips its
solve, so the gradient is the estimator's usual one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._compile import not_compiled
from .._tree import State, flatten, leaves_of, unflatten
from ..linearize import Linearization
from .adjoint import AdjointRule, attach_reverse
from .tangent import in_transform, primal, refuse_forward_over_reverse

SecondOrderRule = Callable[[Tensor, Linearization], Tensor]  # (g with its graph, lin at z1) -> u with a graph

IN_TRANSFORM_MESSAGE = (
    "{name} cannot give second derivatives of a value computed inside torch.func.jvp or jacfwd: there its "
    "reverse graph is first-order only, so a second derivative through it would be wrong and is refused. "
    "Compute the value outside the transform (use torch.autograd.forward_ad dual tensors for its tangent)."
)

THIRD_ORDER_MESSAGE = (
    "{name} gives exact second derivatives, not third: a third backward pass through it is refused rather "
    "than returned wrong. Use gradient=Unrolled() with FixedPointIteration for higher orders."
)


class _Passes:
    """What the two nodes of one attachment share: how many ``create_graph`` passes ``Outer`` has begun."""

    def __init__(self) -> None:
        self.open = 0  # create_graph passes whose cancelled cotangent has not yet reached Inner
        self.seen = False  # a create_graph pass ran: from now on, cotangents reaching Inner are real


def _cotangents(grads: tuple, lin: Linearization) -> Tensor:
    grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, lin.z_leaves, strict=True)]
    return flatten(lin.spec.treespec.unflatten(grads), lin.spec)


def _leaves_for(u_flat: Tensor, lin: Linearization, like: list[Tensor]) -> list[Tensor | None]:
    u_leaves, _ = leaves_of(unflatten(u_flat, lin.spec))
    return [u.to(y.dtype) if y.requires_grad else None for u, y in zip(u_leaves, like, strict=True)]


class _Inner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lin, rule, name, passes, z_star, *fz_leaves):
        ctx.lin, ctx.rule, ctx.name, ctx.passes = lin, rule, name, passes
        return tuple(z.clone() for z in z_star)

    @staticmethod
    def backward(ctx, *grads):
        lin, passes = ctx.lin, ctx.passes
        refuse_forward_over_reverse([*grads, *lin.fz_leaves])
        nothing = (None,) * (5 + len(lin.fz_leaves))
        if torch.is_grad_enabled():
            if passes.open == 0:
                raise RuntimeError(THIRD_ORDER_MESSAGE.format(name=ctx.name))
            passes.open -= 1  # Outer's create_graph pass: what arrives here cancels identically
            return nothing
        if not passes.seen:
            return nothing  # a plain first-order backward: Outer sent nothing here
        g_flat = _cotangents(grads, lin)
        with torch.enable_grad():
            u_flat = ctx.rule(g_flat, lin.vjp)
        return (None,) * 5 + tuple(_leaves_for(u_flat, lin, lin.fz_leaves))


class _Outer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lin, rules, passes, n_z, *tensors):
        ctx.lin, ctx.rules, ctx.passes, ctx.n_z = lin, rules, passes, n_z
        return tuple(z.clone() for z in tensors[:n_z])

    @staticmethod
    def backward(ctx, *grads):
        lin: Linearization = ctx.lin
        passes: _Passes = ctx.passes
        refuse_forward_over_reverse([*grads, *lin.fz_leaves])
        g_flat = _cotangents(grads, lin)
        if torch.is_grad_enabled():  # create_graph=True: u and its flow into z1 with their graphs
            passes.open += 1
            passes.seen = True
            u_flat = ctx.rules[2](g_flat, lin)
            cancel = -lin.vjp(u_flat, create_graph=True)
        else:
            with torch.enable_grad():  # part of a second derivative once one began: exact or refused
                u_flat = ctx.rules[1 if passes.seen else 0](g_flat, lin.vjp)
            cancel = -lin.vjp(u_flat) if passes.seen else None
        z_grads = [None] * ctx.n_z if cancel is None else _leaves_for(cancel, lin, lin.z_leaves)
        return (None,) * 4 + tuple(z_grads) + tuple(_leaves_for(u_flat, lin, lin.fz_leaves))


@not_compiled  # backward passes that solve: untraceable (see functional.py)
def attach_twice_differentiable(
    f: Callable[[State], State],
    z_star: State,
    rule: AdjointRule,
    exact_rule: AdjointRule,
    second_rule: SecondOrderRule,
    name: str,
) -> State:
    """Return ``z_star`` whose gradient is ``rule``'s adjoint and whose second derivatives are exact.

    Arguments:
        f: the map, with a graph to its parameters and inputs.
        z_star: the detached fixed point.
        rule: the flat adjoint ``u`` from the flat ``g`` and a flat VJP ``v -> v J``, for first-order use.
        exact_rule: the same, for the solves that are part of a second derivative: exact or an error.
        second_rule: the same ``u`` with its graph, from ``g`` (with its graph) and the linearisation at
            ``z1`` (whose ``vjp(..., create_graph=True)`` is differentiable in ``theta`` and ``z*``).
        name: the estimator, for the message that refuses third derivatives.
    """
    if not torch.is_grad_enabled():
        return z_star
    if in_transform():  # torch.func.jvp/jacfwd: a first-order graph (the tangent after)
        return attach_reverse(f, z_star, rule, IN_TRANSFORM_MESSAGE.format(name=name))
    lin0 = Linearization(f, z_star)
    if not lin0.reaches_beyond_z():
        return z_star
    passes = _Passes()
    z_leaves, treespec = leaves_of(z_star)
    z1 = _Inner.apply(lin0, exact_rule, name, passes, z_leaves, *map(primal, lin0.fz_leaves))
    lin1 = Linearization(f, treespec.unflatten(list(z1)), attached=True)
    rules = (rule, exact_rule, second_rule)
    out = _Outer.apply(lin1, rules, passes, len(z1), *z1, *map(primal, lin1.fz_leaves))
    return treespec.unflatten(list(out))
