"""Forward-mode AD through a solve: the tangent of the fixed point, attached to the estimator's output.

Under ``torch.func.jvp``, ``torch.func.jacfwd`` or ``torch.autograd.forward_ad`` the parameters and inputs that
``f`` closes over carry tangents. The solve runs on primals (its loop writes into preallocated buffers, which
dual tensors cannot pass through); the tangent of ``z* = f(z*)`` is found afterwards. Differentiating the fixed
point gives ``t = J t + b`` with ``b = (df/dtheta) t_theta``, the tangent of ``f(z*)`` at a constant ``z*``,
and ``J t`` the directional derivative of ``f`` at ``z*``: both are read from forward-mode evaluations of
``f``, so no reverse graph is needed and ``torch.func`` transforms work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .._tree import State, flatten, leaves_of, output_leaves, spec_of, unflatten

JVP = Callable[[Tensor], Tensor]
TangentRule = Callable[[Tensor, JVP], Tensor]  # (b, v -> J v) -> t, all flat [B, D]


def forward_mode_active() -> bool:
    """A forward-AD level is open (``forward_ad.dual_level``, or inside ``torch.func.jvp``/``jacfwd``)."""
    return fwAD._current_level >= 0


NESTED_FORWARD_MESSAGE = (
    "{name} under nested forward mode (a torch.func.jvp inside another, jacfwd of jacfwd) is not supported: "
    "its tangent is found after the solve, at the innermost level only, so the tangents of the outer levels "
    "would come back as zeros. Take the second derivative in reverse mode (IFT(second_order=True) with "
    "torch.autograd.grad(..., create_graph=True)), or use an estimator whose graph is plain autograd "
    "(Unrolled, JFB, Phantom, RAG)."
)


def refuse_nested_forward_mode(name: str) -> None:
    """Raise when more than one forward-mode level is open: :func:`attach_tangent` serves one level."""
    if forward_mode_active():
        levels = sum(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
        if levels > 1:
            raise RuntimeError(NESTED_FORWARD_MESSAGE.format(name=name))


def primals_only() -> fwAD._set_fwd_grad_enabled:
    """A context in which forward-mode AD computes no tangents: the solve runs on primals, at primal cost."""
    return fwAD._set_fwd_grad_enabled(False)


def under_vmap() -> bool:
    """Some ``torch.func.vmap`` (``jacfwd`` is ``vmap`` of ``jvp``) is transforming the current call."""
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def in_transform() -> bool:
    """Inside some ``torch.func`` transform (``jvp``, ``jacfwd``, ``vmap``, ``grad``...), where tensors are
    wrapped: they report ``requires_grad=False`` and refuse ``requires_grad_``."""
    return peek_interpreter_stack() is not None


def under_reverse_transform() -> bool:
    """Some ``torch.func.grad``, ``vjp`` or ``jacrev`` (functorch's reverse mode) is transforming the call."""
    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


def primal(x: Tensor) -> Tensor:
    """``x`` without its tangent (a view that keeps its reverse-mode graph)."""
    return fwAD.unpack_dual(x).primal if forward_mode_active() else x


def _tangent(x: Tensor) -> Tensor | None:
    return fwAD.unpack_dual(x).tangent


REVERSE_THROUGH_TANGENT_MESSAGE = (
    "Back-propagating through the tangent of a fixed point (reverse mode over forward mode) is not "
    "supported: the tangent solve keeps no graph, so that part of the gradient would be missing. Compute the "
    "quantity in reverse mode only (e.g. a vector-Jacobian product with create_graph=True and "
    "IFT(second_order=True)), or detach the tangent if it needs no gradient."
)


class _NoReverse(torch.autograd.Function):
    """The tangent as it is, in a graph whose backward refuses (see REVERSE_THROUGH_TANGENT_MESSAGE).

    With ``setup_context`` and a ``jvp`` rule (no tangent of the tangent) it also runs inside ``torch.func``.
    """

    generate_vmap_rule = True  # jacfwd is vmap of jvp

    @staticmethod
    def forward(t: Tensor, *anchors: Tensor) -> Tensor:
        return t.clone()

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.shape_of = inputs[0]

    @staticmethod
    def jvp(ctx, *tangents: Tensor | None) -> Tensor:
        return torch.zeros_like(ctx.shape_of)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(REVERSE_THROUGH_TANGENT_MESSAGE)


FORWARD_OVER_REVERSE_MESSAGE = (
    "A reverse-mode gradient through an adjoint solve was asked for while the solve's map carries "
    "forward-mode tangents (forward over reverse, e.g. backward() inside forward_ad.dual_level): the adjoint "
    "backward has no forward-mode rule, so the gradient's tangent would be wrong, and it is refused. For "
    "Hessian-vector products differentiate twice in reverse mode with IFT(second_order=True) "
    "(torch.autograd.grad(..., create_graph=True)), or take the gradient outside the dual level."
)


def refuse_forward_over_reverse(tensors: list[Tensor]) -> None:
    """Raise if a backward pass through an adjoint runs on tensors that carry forward-mode tangents."""
    if forward_mode_active() and any(_tangent(t) is not None for t in tensors if t is not None):
        raise RuntimeError(FORWARD_OVER_REVERSE_MESSAGE)


def carries_tangent(f: Callable[[State], State], z: State) -> bool:
    """In forward mode, ``f`` at ``z`` has a tangent: something it closes over is a dual tensor."""
    if not forward_mode_active():
        return False
    with torch.no_grad():
        leaves, _ = leaves_of(f(z))
    return any(_tangent(y) is not None for y in leaves)


def attach_tangent(
    f: Callable[[State], State], z_star: State, out: State, rule: TangentRule, name: str
) -> State:
    """Return ``out`` carrying the tangent ``rule(b, jvp)`` of the fixed point ``z_star`` in forward mode.

    Outside forward mode, or when nothing ``f`` closes over carries a tangent, ``out`` is returned unchanged.

    Arguments:
        f: the map, closing over parameters and inputs that may carry tangents.
        z_star: the fixed point (its own tangent, if any, is ignored: ``z*`` does not depend on ``z0``).
        out: the estimator's output at ``z_star``, equal to it (IFT, Neumann), without a tangent.
        rule: maps the flat ``b`` and a flat ``v -> J v`` to the flat tangent ``t``.
        name: the estimator's, for the refusal of nested forward mode, which this one level cannot serve.
    """
    if not forward_mode_active():
        return out
    refuse_nested_forward_mode(name)
    spec = spec_of(z_star)
    leaves, treespec = leaves_of(z_star)
    z_leaves = [primal(x).detach() for x in leaves]
    fz_leaves = output_leaves(f(treespec.unflatten(z_leaves)), spec)
    b_leaves = [_tangent(y) for y in fz_leaves]
    if all(b is None for b in b_leaves):
        return out
    b_leaves = [torch.zeros_like(z) if b is None else b for b, z in zip(b_leaves, z_leaves, strict=True)]
    b = flatten(treespec.unflatten(b_leaves), spec)

    def jvp(v: Tensor) -> Tensor:
        """``J v``: the tangent of ``f`` at ``z*`` moved along ``v``, less the part that ``theta`` moves (``b``)."""
        v_leaves, _ = leaves_of(unflatten(v, spec))
        duals = [fwAD.make_dual(z, w.to(z.dtype)) for z, w in zip(z_leaves, v_leaves, strict=True)]
        moved = output_leaves(f(treespec.unflatten(duals)), spec)
        tangents = [
            torch.zeros_like(z) if _tangent(y) is None else _tangent(y) for y, z in zip(moved, z_leaves)
        ]
        return flatten(treespec.unflatten(tangents), spec) - b

    with torch.no_grad():
        t = rule(b, jvp)
    wrapped = in_transform()  # its tensors report requires_grad=False
    anchors = [primal(y) for y in fz_leaves if y.requires_grad or wrapped]
    if torch.is_grad_enabled() and anchors:
        t = _NoReverse.apply(t, *anchors)  # a loss on the tangent must not lose its path silently
    t_leaves, _ = leaves_of(unflatten(t, spec))
    out_leaves, out_treespec = leaves_of(out)
    return out_treespec.unflatten(
        [fwAD.make_dual(primal(y), w.to(y.dtype)) for y, w in zip(out_leaves, t_leaves, strict=True)]
    )
