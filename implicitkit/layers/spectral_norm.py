"""Spectral normalisation computed once per solve, its power iteration advancing once per solve."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._settings import as_count
from .per_solve import OncePerSolve
from .weight_norm import _check_unchanged, _weight_dim


def _as_matrix(weight: Tensor, dim: int) -> Tensor:
    """``weight`` as a ``[size(dim), rest]`` matrix."""
    return weight.movedim(dim, 0).flatten(1)


class _SpectralNormalized(torch.autograd.Function):
    """``w = W / sigma``, ``sigma = u^T W v`` with ``u``, ``v`` constants, keeping no saved tensors.

    As for weight norm, holding ``W`` itself lets every loss of a solve back-propagate through this node
    without ``retain_graph``; the backward is differentiable, so second derivatives are exact.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
        sigma = torch.dot(u, _as_matrix(weight, dim) @ v)
        ctx.weight, ctx.u, ctx.v, ctx.dim, ctx.versions = weight, u, v, dim, (weight._version,)
        return weight / sigma

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, u, v, dim = ctx.weight, ctx.u, ctx.v, ctx.dim
        _check_unchanged("spectral_norm", (weight,), ctx.versions)
        sigma = torch.dot(u, _as_matrix(weight, dim) @ v)
        # d(W / sigma) = dW / sigma - W (u^T dW v) / sigma^2
        outer = torch.outer(u, v).reshape(weight.movedim(dim, 0).shape).movedim(0, dim)
        grad_weight = grad / sigma - (torch.sum(grad * weight) / sigma.square()) * outer
        return grad_weight, None, None, None

    @staticmethod
    def jvp(ctx, weight_dot: Tensor | None, _u: None, _v: None, _dim: None) -> Tensor:
        # d(W / sigma) = dW / sigma - W (u^T dW v) / sigma^2, with u and v held constant as in backward
        weight, u, v, dim = ctx.weight, ctx.u, ctx.v, ctx.dim
        if weight_dot is None:
            return torch.zeros_like(weight)
        sigma = torch.dot(u, _as_matrix(weight, dim) @ v)
        sigma_dot = torch.dot(u, _as_matrix(weight_dot, dim) @ v)
        return weight_dot / sigma - weight * (sigma_dot / sigma.square())


class SpectralNorm(OncePerSolve):
    """The parametrization of :func:`spectral_norm`: ``w = W / sigma(W)``, ``sigma`` by power iteration.

    The singular vectors ``u``, ``v`` are buffers; in training mode they take ``n_power_iterations`` steps
    once per solve (on the solve's first access), as :func:`torch.nn.utils.parametrizations.spectral_norm`
    takes them at every access.
    """

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12) -> None:
        super().__init__()
        if weight.dim() < 2:
            raise ValueError(
                f"spectral_norm needs a weight of 2 or more dimensions, got shape {tuple(weight.shape)}."
            )
        n_power_iterations = as_count("n_power_iterations", n_power_iterations)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be at least 1, got {n_power_iterations}.")
        self.dim = _weight_dim(weight, dim)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        matrix = _as_matrix(weight.detach(), self.dim)
        u = F.normalize(matrix.new_empty(matrix.shape[0]).normal_(), dim=0, eps=eps)
        v = F.normalize(matrix.new_empty(matrix.shape[1]).normal_(), dim=0, eps=eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(matrix, 15)  # start near the top singular pair, as PyTorch does

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, steps: int) -> None:
        for _ in range(steps):
            self._u.copy_(F.normalize(matrix @ self._v, dim=0, eps=self.eps))
            self._v.copy_(F.normalize(matrix.mT @ self._u, dim=0, eps=self.eps))

    def compute(self, weight: Tensor) -> Tensor:
        if self.training:
            self._power_iteration(_as_matrix(weight.detach(), self.dim), self.n_power_iterations)
        return self.recompute(weight)

    def recompute(self, weight: Tensor) -> Tensor:
        # The solve's u and v, not advanced again. Copies: the next solve's power iteration writes the
        # buffers while this solve's graph may live on.
        return _SpectralNormalized.apply(weight, self._u.clone(), self._v.clone(), self.dim)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight


def spectral_norm(
    module: nn.Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    dim: int | None = None,
    eps: float = 1e-12,
) -> nn.Module:
    """Reparametrize ``module.<name>`` as ``W / sigma(W)``, computed once per solve.

    ``sigma`` is the largest singular value of the weight (as a ``[size(dim), rest]`` matrix), estimated by
    power iteration; ``torch.nn.utils.parametrizations.spectral_norm`` advances it and recomputes the weight
    at every access, that is at every solver step of a DEQ cell. Here both happen once per solve, and
    ``u``, ``v`` are constants for the gradient, as in PyTorch. The raw weight is
    ``module.parametrizations.<name>.original``.

    Arguments:
        module: the layer holding the weight, modified in place.
        name: the parameter to normalise.
        n_power_iterations: power-iteration steps per solve (training mode only).
        dim: the output dimension; default, as in PyTorch's version, 1 for transposed convolutions (their
            weight is ``[in, out, ...]``) and 0 for every other layer.
        eps: floor of the norms in the power iteration.

    Returns:
        ``module``, now parametrized.

    Reference: Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
    """
    weight = getattr(module, name)
    if dim is None:
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        dim = 1 if isinstance(module, transposed) else 0
    parametrize.register_parametrization(
        module, name, SpectralNorm(weight, n_power_iterations, dim, eps), unsafe=True
    )
    return module
