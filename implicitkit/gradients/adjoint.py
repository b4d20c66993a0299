"""An autograd function whose backward maps ``g = dL/dz*`` to an adjoint ``u`` computed with VJPs of f.

The forward pass returns ``z*`` unchanged; the function's inputs are the leaves of ``f(z*)`` computed with a
graph to the parameters and inputs. Its backward hands ``u`` to those leaves, so autograd finishes with
``u df/dtheta`` and ``u df/dx``. No hook is registered on any module or parameter, which keeps this safe
under DistributedDataParallel and with modules that appear twice in a graph.

Second derivatives through this backward would need the adjoint system itself differentiated (``u``
depends on ``z*`` and ``theta`` through ``J``); they are refused with an error rather than returned wrong
(``second_order.py`` builds the twice-differentiable variant).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import TreeSpec

from .._compile import not_compiled
from .._tree import State, flatten, leaves_of, output_leaves, spec_of, unflatten
from ..linearize import Linearization
from .tangent import (
    TangentRule,
    attach_tangent,
    in_transform,
    primal,
    refuse_forward_over_reverse,
    under_reverse_transform,
)

AdjointRule = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]

HIGHER_ORDER_MESSAGE = (
    "{name} does not differentiate its own backward pass: a second derivative through it would treat the "
    "adjoint as a constant and be wrong, so it is refused. For exact second derivatives (create_graph=True) "
    "pass IFT(second_order=True) or Neumann(k, second_order=True), or use gradient=Unrolled() with "
    "FixedPointIteration (exact for the steps taken), or Phantom/RAG, whose graphs are ordinary autograd."
)

REVERSE_TRANSFORM_MESSAGE = (
    "IFT and Neumann cannot run under torch.func.grad, vjp or jacrev: their backward solves for the adjoint "
    "with torch.autograd inside the transform, which functorch does not allow. Take the gradient with "
    "loss.backward() or torch.autograd.grad (torch.func.jvp works, and jacfwd with Neumann), or "
    "use JFB, Phantom, RAG or Unrolled, whose graphs are plain autograd."
)


class _LinearizeLater:
    """``f`` and the structure of ``z*``, for a linearisation built in the backward pass.

    Inside ``torch.func.jvp`` no graph can be started at a point (``requires_grad_`` is refused there), so the
    graph of ``f(z*)`` that the VJPs ``v -> v J`` need is built when the backward runs, outside the transform.
    """

    def __init__(self, f: Callable[[State], State], treespec: TreeSpec) -> None:
        self.f, self.treespec = f, treespec

    def at(self, z_leaves: Sequence[Tensor]) -> Linearization:
        return Linearization(self.f, self.treespec.unflatten(list(z_leaves)))


class _Adjoint(torch.autograd.Function):
    """``z*`` as it is; its backward hands the adjoint ``u = rule(g, vjp)`` to the leaves of ``f(z*)``.

    Inputs: the linearisation (or a :class:`_LinearizeLater`), the rule, the refusal message, the number of
    leaves of ``z*``, then those leaves and the leaves of ``f(z*)`` with their graph. With ``setup_context``
    and a ``jvp`` rule it also runs inside ``torch.func.jvp``, which builds its reverse graph on the primals;
    the tangent of ``z*`` is attached afterwards (:func:`attach_tangent`), so the rule here gives zeros.
    """

    @staticmethod
    def forward(
        lin: Linearization | _LinearizeLater, rule: AdjointRule, refusal: str, n_z: int, *leaves: Tensor
    ):
        return tuple(z.clone() for z in leaves[:n_z])

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        ctx.lin, ctx.rule, ctx.refusal, ctx.n_z = inputs[:4]
        ctx.z_leaves = inputs[4 : 4 + ctx.n_z]

    @staticmethod
    def jvp(ctx, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        return tuple(torch.zeros_like(z) for z in ctx.z_leaves)

    @staticmethod
    def vmap(info, in_dims: tuple, *inputs):
        """``jacfwd`` (``vmap`` of ``jvp``) batches the tangents only: the primals reach here unbatched and
        the function runs as it is, so that its backward runs outside the transform."""
        if any(dim is not None for dim in in_dims):
            raise RuntimeError(
                "An adjoint (IFT, Neumann) cannot be attached to a fixed point batched by torch.func.vmap; "
                "put the samples in the state's first dimension instead."
            )
        return _Adjoint.apply(*inputs), (None,) * inputs[3]

    @staticmethod
    def backward(ctx, *grads: Tensor):
        if torch.is_grad_enabled():  # backward(create_graph=True): a second derivative is coming
            raise RuntimeError(ctx.refusal)
        lin = ctx.lin if isinstance(ctx.lin, Linearization) else ctx.lin.at(ctx.z_leaves)
        refuse_forward_over_reverse([*grads, *lin.fz_leaves])
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, lin.z_leaves, strict=True)]
        g_flat = flatten(lin.spec.treespec.unflatten(grads), lin.spec)
        with torch.enable_grad():
            u_flat = ctx.rule(g_flat, lin.vjp)
        u_leaves, _ = leaves_of(unflatten(u_flat, lin.spec))
        fz_needs_grad = ctx.needs_input_grad[4 + ctx.n_z :]
        return (
            *(None for _ in range(4 + ctx.n_z)),
            *(
                u.to(fz.dtype) if needs else None
                for u, fz, needs in zip(u_leaves, lin.fz_leaves, fz_needs_grad, strict=True)
            ),
        )


@not_compiled  # a graph walk and a backward that solves: untraceable (see functional.py)
def attach_adjoint(
    f: Callable[[State], State],
    z_star: State,
    rule: AdjointRule,
    name: str,
    tangent_rule: TangentRule | None = None,
    *,
    refusal: str | None = None,
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
        refusal: the message that refuses a derivative through this backward; by default the one naming
            ``name`` and the estimators that allow second derivatives.
    """
    out = attach_reverse(f, z_star, rule, refusal or HIGHER_ORDER_MESSAGE.format(name=name))
    return out if tangent_rule is None else attach_tangent(f, z_star, out, tangent_rule, name)


def attach_reverse(f: Callable[[State], State], z_star: State, rule: AdjointRule, refusal: str) -> State:
    """:func:`attach_adjoint` without the tangent: ``z_star`` whose backward applies `rule`; a derivative
    through that backward raises `refusal`."""
    if not torch.is_grad_enabled():
        return z_star
    if under_reverse_transform():
        raise RuntimeError(REVERSE_TRANSFORM_MESSAGE)
    z_leaves, treespec = leaves_of(z_star)
    if in_transform():  # inside torch.func.jvp / jacfwd
        # z* needs no grad: a graph to what f closes over only. Whether anything needs a gradient cannot be
        # read here (the transform's tensors report requires_grad=False); autograd decides it below.
        with torch.enable_grad():
            fz_leaves = output_leaves(f(z_star), spec_of(z_star))
        lin: Linearization | _LinearizeLater = _LinearizeLater(f, treespec)
    else:
        lin = Linearization(f, z_star)
        if not lin.reaches_beyond_z():
            return z_star
        fz_leaves = lin.fz_leaves
    fz_leaves = [primal(y) for y in fz_leaves]  # the tangent is attached after, by attach_tangent
    return treespec.unflatten(list(_Adjoint.apply(lin, rule, refusal, len(z_leaves), *z_leaves, *fz_leaves)))
