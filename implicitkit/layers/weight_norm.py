"""Weight normalisation computed once per solve."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .per_solve import OncePerSolve


def _other_dims(v: Tensor, dim: int | None) -> list[int]:
    return [d for d in range(v.dim()) if dim is None or d != dim % v.dim()]


def _norm(v: Tensor, dim: int | None) -> Tensor:
    """``||v||`` over every dimension but ``dim`` (all of them for None), kept as size-1 dimensions."""
    return torch.linalg.vector_norm(v, dim=_other_dims(v, dim), keepdim=True)


def _weight_dim(weight: Tensor, dim: int) -> int:
    """`dim` of `weight` as a non-negative index; an ``IndexError`` (as PyTorch's own) when out of range."""
    if not -weight.dim() <= dim < weight.dim():
        raise IndexError(
            f"dim {dim} is out of range for a weight of shape {tuple(weight.shape)} "
            f"(expected -{weight.dim()}..{weight.dim() - 1})."
        )
    return dim % weight.dim()


def _check_unchanged(name: str, tensors: tuple[Tensor, ...], versions: tuple[int, ...]) -> None:
    if tuple(t._version for t in tensors) != versions:
        raise RuntimeError(
            f"The raw weights of {name} were modified in place (an optimiser step?) after the normalised weight "
            "was computed and before this backward pass, so its gradient would be wrong. Back-propagate every "
            "loss of a solve before stepping the optimiser."
        )


class _WeightNormalized(torch.autograd.Function):
    """``w = g v / ||v||`` with a closed-form backward that keeps no saved tensors.

    Every loss of a solve (the value's, each path branch's) back-propagates through this one node; holding
    ``g`` and ``v`` themselves, not saved copies, lets it run once per backward pass without
    ``retain_graph``. Its backward is built from differentiable operations, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, g: Tensor, v: Tensor, dim: int) -> Tensor:
        ctx.g, ctx.v, ctx.dim, ctx.versions = g, v, dim, (g._version, v._version)
        return g * (v / _norm(v, dim))

    @staticmethod
    def backward(ctx, grad: Tensor):
        g, v, dim = ctx.g, ctx.v, ctx.dim
        _check_unchanged("weight_norm", (g, v), ctx.versions)
        norm = _norm(v, dim)
        # <grad, v> over each slice, the derivative of w along v's own direction.
        along = torch.sum(grad * v, dim=_other_dims(v, dim), keepdim=True)
        grad_g = (along / norm).reshape(g.shape)  # g is a scalar for the whole-tensor norm
        grad_v = (g / norm) * (grad - (along / norm.square()) * v)
        return grad_g, grad_v, None

    @staticmethod
    def jvp(ctx, g_dot: Tensor | None, v_dot: Tensor | None, _dim: None) -> Tensor:
        # dw = dg u + (g / ||v||) (dv - u <u, dv>),  u = v / ||v||
        g, v, dim = ctx.g, ctx.v, ctx.dim
        norm = _norm(v, dim)
        unit = v / norm
        out = torch.zeros_like(v) if g_dot is None else g_dot * unit
        if v_dot is not None:
            along = torch.sum(unit * v_dot, dim=_other_dims(v, dim), keepdim=True)
            out = out + (g / norm) * (v_dot - along * unit)
        return out


class WeightNorm(OncePerSolve):
    """The parametrization of :func:`weight_norm`: ``w = g v / ||v||``, ``g`` one scale per slice of ``dim``.

    Raw tensors: ``original0 = g`` (shape of ``w`` with size 1 off ``dim``; a scalar for ``dim=None``, one
    norm of the whole tensor) and ``original1 = v``.
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = dim

    def compute(self, g: Tensor, v: Tensor) -> Tensor:
        return _WeightNormalized.apply(g, v, self.dim)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        norm = _norm(weight, self.dim)
        return (norm.reshape(()) if self.dim is None else norm), weight


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Reparametrize ``module.<name>`` as ``g v / ||v||``, computed once per solve.

    ``torch.nn.utils.parametrizations.weight_norm`` recomputes the weight at every access, that is at
    every solver step of a DEQ cell; this one computes it on the first access of a solve and reuses it for
    the solve's other steps and its backward. The raw tensors are
    ``module.parametrizations.<name>.original0`` (``g``) and ``original1`` (``v``), as in PyTorch's version.

    Arguments:
        module: the layer holding the weight (``nn.Linear``, ``nn.Conv2d``, ...), modified in place.
        name: the parameter to normalise.
        dim: the dimension that keeps one scale per slice (0: per output unit or channel); ``None`` or
            ``-1``, as in PyTorch's version, one norm and one scale for the whole tensor.

    Returns:
        ``module``, now parametrized.

    Reference: Salimans & Kingma, "Weight normalization", NeurIPS 2016.
    """
    if dim == -1:  # PyTorch's spelling of the whole tensor (torch._weight_norm), not the last dimension
        dim = None
    if dim is not None:
        _weight_dim(getattr(module, name), dim)  # refused before the module is changed
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)
    return module
