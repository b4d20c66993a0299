"""Perturbations of the solver's path while training: the protocol and a norm-relative Gaussian one.

A perturbation is any callable ``(state, step) -> state``. The solver calls it on the current iterate before
each application of the map (steps count from 1) and continues from what it returns: the perturbed path is
kept, not restored. It runs without a graph, except under :class:`~implicitkit.Unrolled`, which differentiates
the loop as it ran: there the gradient flows through the perturbation as through the map (through
``||q||`` for :class:`GaussianPerturbation`). :class:`~implicitkit.DEQ` passes it in training mode only.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._tree import State, leaves_of

LeafSelector = Hashable  # a top-level key/index, or a tuple: the path of keys/indices to a leaf or subtree


@runtime_checkable
class Perturbation(Protocol):
    """``(state, step) -> state``: disturb the iterate before solver step ``step`` (counted from 1)."""

    def __call__(self, state: State, step: int) -> State: ...


class GaussianPerturbation:
    """With probability ``prob`` per step, move the chosen leaves towards norm-relative Gaussian noise.

    ``q <- (1 - s) q + s ||q|| eps``,  ``eps ~ N(0, I)``,

    where the norm is taken over ``dim`` (the channel dimension: for content ``[B, N, C]`` one norm per query):
    each element of the noise has standard deviation ``s ||q||``, so the noise vector's norm is about
    ``s sqrt(C) ||q||``, ``C`` the size over ``dim`` (16 ``||q||`` for ``C = 256`` at ``s = 1``), the rule of deep
    equilibrium detection's reference training. One Bernoulli draw per step decides for the whole batch
    whether the step is perturbed, as the refinement-aware perturbation of deep equilibrium detection does;
    ``eps`` is then drawn independently for every element.

    Arguments:
        prob: probability that a step is perturbed.
        scale: ``s`` in ``[0, 1]``; 0 leaves the state untouched, 1 replaces it by noise of per-element scale
            ``||q||``.
        leaves: which leaves of a structured state to perturb, default all. A selector is a top-level key or
            index (``1`` for the second tensor of a tuple, ``"content"`` for a dict) or a tuple of them, the
            path to a leaf or a subtree (``("query", "content")``, ``(0, 0)``); several selectors go in a
            list (``["boxes", ("query", "content")]``).
        dim: the dimension(s) of the norm; default the last.
        generator: source of randomness, for reproducible paths; default the global generator. Draws are
            made on the generator's device.

    Reference: Wang et al., "Deep equilibrium object detection", ICCV 2023 (prob 0.2, scale 0.1).
    """

    def __init__(
        self,
        prob: float = 0.2,
        scale: float = 0.1,
        *,
        leaves: Collection[LeafSelector] | LeafSelector | None = None,
        dim: int | tuple[int, ...] = -1,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob}.")
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale must lie in [0, 1], got {scale}.")
        one = _is_path(leaves) or isinstance(leaves, str | int) or not isinstance(leaves, Collection)
        if leaves is not None and one:  # a tuple of keys is one path, not several top-level keys
            leaves = [leaves]
        if leaves is not None and len(leaves) == 0:
            raise ValueError(
                f"leaves={leaves!r} perturbs nothing; pass None for every leaf, or prob=0 to turn it off."
            )
        self._dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if 0 in self._dims:
            raise ValueError(
                f"dim={dim} includes the batch dimension 0, so one sample's noise would scale with the others; "
                "take the norm over feature dimensions only (negative indices count from the last)."
            )
        self.prob, self.scale, self.dim, self.generator = float(prob), float(scale), dim, generator
        self.leaves = None if leaves is None else [s if isinstance(s, tuple) else (s,) for s in leaves]

    def __call__(self, state: State, step: int) -> State:
        paths, treespec = _leaf_paths(state)
        chosen = self._chosen(paths)
        leaves, _ = leaves_of(state)
        if self.prob == 0.0 or self.scale == 0.0 or not self._draw(leaves[0].device):
            return state
        out = [self._perturb(x) if keep else x for x, keep in zip(leaves, chosen, strict=True)]
        return pytree.tree_unflatten(out, treespec)

    def _draw(self, device: torch.device) -> bool:
        device = self.generator.device if self.generator is not None else device
        return bool(torch.rand((), generator=self.generator, device=device) < self.prob)

    def _perturb(self, q: Tensor) -> Tensor:
        if q.dim() < 2:
            raise ValueError(
                f"GaussianPerturbation needs leaves with a feature dimension after the batch, got shape "
                f"{tuple(q.shape)}; exclude this leaf with leaves=... ."
            )
        if any(d % q.dim() == 0 for d in self._dims):
            raise ValueError(
                f"dim={self.dim} reaches the batch dimension of a leaf of shape {tuple(q.shape)}, so one sample's "
                "noise would scale with the others; take the norm over feature dimensions only."
            )
        device = self.generator.device if self.generator is not None else q.device
        eps = torch.randn(q.shape, generator=self.generator, device=device, dtype=q.dtype).to(q.device)
        norm = torch.linalg.vector_norm(q, dim=self.dim, keepdim=True)
        return (1.0 - self.scale) * q + self.scale * norm * eps

    def _chosen(self, paths: list[tuple]) -> list[bool]:
        if self.leaves is None:
            return [True] * len(paths)
        for selector in self.leaves:
            if not any(path[: len(selector)] == selector for path in paths):
                shown = selector[0] if len(selector) == 1 else selector
                several = len(selector) > 1 and all(any(p[:1] == (k,) for p in paths) for k in selector)
                hint = (
                    f" A tuple is one path; for several leaves pass a list, {list(selector)!r}."
                    if several
                    else ""
                )
                raise ValueError(
                    f"GaussianPerturbation(leaves=...) names {shown!r}, which is no leaf of the state; "
                    f"its leaves are at {paths}.{hint}"
                )
        return [any(path[: len(s)] == s for s in self.leaves) for path in paths]

    def __repr__(self) -> str:
        return f"GaussianPerturbation(prob={self.prob}, scale={self.scale}, leaves={self.leaves}, dim={self.dim})"


def _is_path(selector: object) -> bool:
    """A non-empty tuple of keys/indices: one path into a nested state (``("query", "content")``)."""
    return (
        isinstance(selector, tuple) and len(selector) > 0 and all(isinstance(k, str | int) for k in selector)
    )


def _leaf_paths(state: State) -> tuple[list[tuple], pytree.TreeSpec]:
    """Each leaf's path as a tuple of plain keys/indices (``()`` for a single tensor)."""
    with_paths, treespec = pytree.tree_flatten_with_path(state)
    return [tuple(_plain_key(k) for k in path) for path, _ in with_paths], treespec


def _plain_key(key) -> Hashable:
    for attribute in ("idx", "key", "name"):  # SequenceKey, MappingKey, GetAttrKey
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return key
