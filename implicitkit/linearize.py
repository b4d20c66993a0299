"""``f`` linearised at a point: its image with a graph, and vector-Jacobian products ``v -> v J``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._tree import State, check_same_structure, flatten, leaves_of, spec_of, unflatten


class Linearization:
    """``f(z)`` evaluated once with a graph at a detached copy of ``z``, for repeated VJPs with ``J = df/dz``.

    The one place where IFT, Neumann, the Jacobian regulariser and the diagnostics evaluate ``f`` for
    products with its Jacobian. ``z`` is detached: products differentiate ``f`` at the point, not the point.

    Arguments:
        f: the map, with autograd to its parameters and inputs.
        z: the point, a tensor ``[B, ...]`` or a structured state.
        attached: keep ``z`` with its graph (it must require grad) instead of a detached copy.

    Attributes:
        spec: the state's structure.
        z_leaves: the leaves of the detached point, which require grad.
        fz_leaves: the leaves of ``f(z)``, with their graph.
        depends_on_z: some leaf of ``f(z)`` has a graph (else ``J = 0``).
    """

    def __init__(self, f: Callable[[State], State], z: State, *, attached: bool = False) -> None:
        self.spec = spec_of(z)
        leaves, treespec = leaves_of(z)
        # attached: products at ``z`` as it is, so they are differentiable through ``z``'s own graph too
        self.z_leaves = list(leaves) if attached else [x.detach().requires_grad_() for x in leaves]
        with torch.enable_grad():
            fz = f(treespec.unflatten(self.z_leaves))
        fz_leaves, fz_treespec = leaves_of(fz)
        self.fz_leaves = check_same_structure(self.spec, fz_treespec, fz_leaves, fz)
        self._outputs = [(i, y) for i, y in enumerate(self.fz_leaves) if y.requires_grad]

    @property
    def depends_on_z(self) -> bool:
        return bool(self._outputs)

    def reaches_beyond_z(self) -> bool:
        """Some tensor other than ``z`` (a parameter, an input) can receive a gradient through ``f(z)``.

        False for a frozen cell with inputs that need no gradient: an adjoint solve would then feed nothing.
        Walks the graph of ``f(z)`` until the first leaf that is not ``z``.
        """
        own = {id(z) for z in self.z_leaves}
        seen: set[int] = set()
        stack = [y.grad_fn for _, y in self._outputs if y.grad_fn is not None]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
            if variable is not None and id(variable) not in own:
                return True
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
        return False

    def vjp(self, v: Tensor, *, create_graph: bool = False, retain_graph: bool = True) -> Tensor:
        """``v J`` for a flat ``v`` ``[B, D]``, as one reverse pass through the graph of ``f(z)``.

        Arguments:
            v: the flat cotangent.
            create_graph: make the product differentiable (for a loss on it, as the regulariser is).
            retain_graph: keep the graph of ``f(z)`` for more products.
        """
        if not self._outputs:
            return torch.zeros_like(v)
        v_leaves, _ = leaves_of(unflatten(v, self.spec))
        outputs = [y for _, y in self._outputs]
        cotangents = [v_leaves[i].to(y.dtype) for i, y in self._outputs]
        grads = torch.autograd.grad(
            outputs,
            self.z_leaves,
            cotangents,
            create_graph=create_graph,
            retain_graph=retain_graph or create_graph,
            allow_unused=True,
        )
        grads = [torch.zeros_like(z) if g is None else g for g, z in zip(grads, self.z_leaves, strict=True)]
        return flatten(self.spec.treespec.unflatten(grads), self.spec)
