"""The tensors a map closes over, found by watching it run, so gradients can be taken with respect to them.

``fixed_point`` accepts any callable ``f``: its parameters and inputs are whatever it closes over. An
estimator whose backward needs ``v df/dtheta`` at many points (not only at ``z*``) must name those tensors
to return their gradients through an ``autograd.Function``. :class:`ClosureInputs` finds them by watching
one call of ``f`` with a :class:`~torch.overrides.TorchFunctionMode`: every tensor handed to a torch
operation that the call did not itself produce, and that requires grad, is one of them. A walk of the call's
graph then checks that nothing else feeds a gradient, so a tensor the watch missed is an error, not a
silently dropped gradient.

:meth:`ClosureInputs.vjp` evaluates ``f`` with each of those tensors swapped for a detached alias that
requires grad: ``torch.autograd.grad`` with respect to the aliases gives the partial derivatives of ``f``
alone, and never traverses the graph that produced the inputs (an encoder's), however often it is called.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_MISSED = (
    "{what} Reversible differentiates f at many points, so it finds the tensors f closes over that need a "
    "gradient (parameters, inputs) by watching the torch operations f calls. Run f's operations with torch "
    "function handling enabled (not under torch._C.DisableTorchFunction, nor in a C extension that bypasses "
    "__torch_function__), and use the same tensors in every call of f."
)


class _Watch(TorchFunctionMode):
    """Records the tensors requiring grad that enter torch operations from outside the call; swaps aliases."""

    def __init__(self, own: list[Tensor], aliases: dict[int, Tensor] | None = None) -> None:
        super().__init__()
        self.aliases = aliases or {}
        # Ids of what the call made. One may be reused once its tensor dies, but never by a closure tensor:
        # those live through the whole call, so an id seen here cannot be theirs.
        self._produced = {id(t) for t in own}
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = pytree.tree_map_only(Tensor, self._visit, (args, kwargs or {}))
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self._produced.add(id(t))
        return out

    def _visit(self, t: Tensor) -> Tensor:
        if id(t) in self._produced:
            return t
        alias = self.aliases.get(id(t))
        if alias is not None:
            return alias
        if t.requires_grad:
            self.found.setdefault(id(t), t)
        return t


class ClosureInputs:
    """The tensors requiring grad that ``f`` closes over, found by one watched call at ``probe``.

    Arguments:
        f: the map on flat states ``[B, D] -> [B, D]``.
        probe: a point to call it at (detached; its value does not matter unless f's code path depends on it).

    Attributes:
        tensors: the closure tensors that need a gradient, in the order they were first used.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], probe: Tensor) -> None:
        point = probe.detach().requires_grad_()
        watch = _Watch([point])
        with torch.enable_grad(), watch:
            out = f(point)
        self.tensors = list(watch.found.values())
        self._check_complete(out, point)

    def _check_complete(self, out: Tensor, point: Tensor) -> None:
        """Walk the graph of ``f(point)`` up to the found tensors; reaching any other leaf means one was missed."""
        stops = {_edge_key(t) for t in self.tensors} | {_edge_key(point)}
        stack = [(out.grad_fn, 0)] if out.grad_fn is not None else []
        seen: set[int] = set()
        while stack:
            node, _ = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None:  # an AccumulateGrad node: a leaf that is neither the point nor found
                raise RuntimeError(
                    _MISSED.format(
                        what=f"A tensor of shape {tuple(variable.shape)} feeds f's "
                        "gradient but was never seen entering a torch operation."
                    )
                )
            for nxt, nr in node.next_functions:
                if nxt is not None and (id(nxt), nr) not in stops:
                    stack.append((nxt, nr))

    def vjp(
        self, f: Callable[[Tensor], Tensor], z: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, list[Tensor | None]]:
        """``f(z)`` and the products ``v df/dz`` and ``v df/dt`` for each closure tensor ``t``, from one call of f.

        Inside the call each closure tensor is swapped for a detached alias, so the products are partial
        derivatives of ``f`` alone and never traverse the graph that produced the tensors. A tensor that
        reaches an operation the watch does not see (inside a custom ``autograd.Function``, say) keeps its
        own edge; its product is then taken at the tensor itself and added.

        Returns:
            ``(f(z) detached, v df/dz, [v df/dt or None])``.
        """
        z_leaf = z.detach().requires_grad_()
        aliases = [t.detach().requires_grad_() for t in self.tensors]
        watch = _Watch([z_leaf, *aliases], {id(t): a for t, a in zip(self.tensors, aliases, strict=True)})
        with torch.enable_grad(), watch:
            out = f(z_leaf)
        if watch.found:
            shapes = ", ".join(str(tuple(t.shape)) for t in watch.found.values())
            raise RuntimeError(
                _MISSED.format(what=f"f used tensors requiring grad that the first call did not ({shapes}).")
            )
        if not out.requires_grad:
            return out.detach(), torch.zeros_like(v), [None] * len(self.tensors)
        inputs = [z_leaf, *aliases, *self.tensors]
        parts = torch.autograd.grad(out, inputs, v.to(out.dtype), allow_unused=True)
        n = len(self.tensors)
        products = [_add(a, b) for a, b in zip(parts[1 : 1 + n], parts[1 + n :], strict=True)]
        return out.detach(), parts[0] if parts[0] is not None else torch.zeros_like(v), products


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _edge_key(t: Tensor) -> tuple[int, int]:
    """The graph edge a gradient for ``t`` flows into: its ``grad_fn`` and output index, or its accumulator."""
    edge = torch.autograd.graph.get_gradient_edge(t)
    return id(edge.node), edge.output_nr
