"""An autograd function whose backward maps ``g = dL/dz*`` to an adjoint ``u`` computed with VJPs of f.

The forward pass returns ``z*`` unchanged; the function's inputs are the leaves of ``f(z*)`` computed with a
graph to the parameters and inputs. Its backward hands ``u`` to those leaves, so autograd finishes with
``u df/dtheta`` and ``u df/dx``. No hook is registered on any module or parameter, which keeps this safe
under DistributedDataParallel and with modules that appear twice in a graph.

Second derivatives through this backward would need the adjoint system itself differentiated (``u``
depends on ``z*`` and ``theta`` through ``J``); they are refused with an error rather than returned wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack

from .._tree import State, flatten, leaves_of, unflatten
from ..linearize import Linearization
from .tangent import TangentRule, attach_tangent, forward_mode_active, primal

AdjointRule = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]

HIGHER_ORDER_MESSAGE = (
    "{name} does not differentiate its own backward pass: a second derivative through it would treat the "
    "adjoint as a constant and be wrong, so it is refused. For higher-order gradients (create_graph=True) use "
    "gradient=Unrolled() with FixedPointIteration (exact for the steps taken), or Phantom/RAG, whose "
    "graphs are ordinary autograd."
)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, lin: Linearization, rule: AdjointRule, name: str, z_star: list[Tensor], *fz_leaves: Tensor
    ):
        ctx.lin, ctx.rule, ctx.name = lin, rule, name
        return tuple(z.clone() for z in z_star)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is coming
            raise RuntimeError(HIGHER_ORDER_MESSAGE.format(name=ctx.name))
        lin: Linearization = ctx.lin
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, lin.z_leaves, strict=True)]
        g_flat = flatten(lin.spec.treespec.unflatten(grads), lin.spec)
        with torch.enable_grad():
            u_flat = ctx.rule(g_flat, lin.vjp)
        u_leaves, _ = leaves_of(unflatten(u_flat, lin.spec))
        return (
            None,
            None,
            None,
            None,
            *(
                u.to(fz.dtype) if fz.requires_grad else None
                for u, fz in zip(u_leaves, lin.fz_leaves, strict=True)
            ),
        )


@torch.compiler.disable  # a graph walk and a backward that solves: untraceable (see functional.py)
def attach_adjoint(
    f: Callable[[State], State],
    z_star: State,
    rule: AdjointRule,
    name: str,
    tangent_rule: TangentRule | None = None,
) -> State:
    """Return ``z_star`` whose backward applies ``rule(g, vjp) -> u`` and then backpropagates ``u`` through f.

    Without autograd, or when nothing but ``z`` could receive a gradient through ``f`` (a frozen cell with
    inputs that need none), ``z_star`` is returned as it is and no adjoint is ever solved. In forward mode
    the result also carries the tangent ``tangent_rule(b, jvp)`` (see :func:`attach_tangent`).

    Arguments:
        f: the map, with a graph to its parameters and inputs.
        z_star: the detached fixed point (any supported structure).
        rule: computes the flat adjoint ``u`` from the flat ``g`` and a flat VJP ``v -> v J``.
        name: the estimator's name, for the message that refuses second derivatives.
        tangent_rule: computes the flat tangent ``t`` from the flat ``b`` and a flat JVP ``v -> J v``.
    """
    out = _attach_reverse(f, z_star, rule, name)
    return out if tangent_rule is None else attach_tangent(f, z_star, out, tangent_rule)


def _attach_reverse(f: Callable[[State], State], z_star: State, rule: AdjointRule, name: str) -> State:
    if not torch.is_grad_enabled():
        return z_star
    if forward_mode_active() and peek_interpreter_stack() is not None:
        return z_star  # inside torch.func.jvp/jacfwd: no reverse graph can be built there, nor is one wanted
    lin = Linearization(f, z_star)
    if not lin.reaches_beyond_z():
        return z_star
    z_star_leaves, _ = leaves_of(z_star)
    fz_leaves = [primal(y) for y in lin.fz_leaves]  # the tangent is attached after, by attach_tangent
    out = _Adjoint.apply(lin, rule, name, z_star_leaves, *fz_leaves)
    return lin.spec.treespec.unflatten(list(out))
