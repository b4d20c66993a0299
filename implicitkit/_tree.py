"""Structured states: flatten a tensor or a tuple/list/dict of tensors into one ``[B, D]`` matrix.

Solvers work on a single batch-major matrix so that per-sample norms, masks and least-squares solves are
plain batched tensor ops. Leaves keep their own shapes and dtypes; only the solver's copy is flat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

State = Any  # a Tensor, or a (nested) tuple/list/dict of Tensors whose first dimension is the batch


@dataclass(frozen=True)
class StateSpec:
    """The structure, shapes and dtypes of a state, enough to rebuild it from its flat form."""

    treespec: pytree.TreeSpec
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def batch_size(self) -> int:
        return self.shapes[0][0]

    @property
    def sizes(self) -> list[int]:
        """Per-sample number of elements of each leaf."""
        return [int(torch.Size(s[1:]).numel()) for s in self.shapes]

    def describe(self) -> str:
        leaves = ", ".join(
            f"{tuple(s)}:{str(d).removeprefix('torch.')}" for s, d in zip(self.shapes, self.dtypes)
        )
        return f"{self.treespec.type.__name__ if self.treespec.type else 'Tensor'}[{leaves}]"


def leaves_of(state: State) -> tuple[list[Tensor], pytree.TreeSpec]:
    """Leaves and structure of a state, checking every leaf is a tensor with the same batch size."""
    leaves, treespec = pytree.tree_flatten(state)
    if not leaves:
        raise TypeError("The fixed-point state is empty: pass a tensor or a tuple/list/dict of tensors.")
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"Leaf {i} of the fixed-point state is a {type(leaf).__name__}, not a tensor. States must be a "
                "tensor or a tuple/list/dict of tensors; pass constants to the cell as extra inputs instead."
            )
        if leaf.dim() == 0:
            raise ValueError(
                f"Leaf {i} of the state is a scalar; every leaf needs a leading batch dimension."
            )
    batch = leaves[0].shape[0]
    for i, leaf in enumerate(leaves):
        if leaf.shape[0] != batch:
            raise ValueError(
                f"Leaf {i} of the state has batch size {leaf.shape[0]} but leaf 0 has {batch}; every leaf "
                "must put the batch first with the same size."
            )
    return leaves, treespec


def spec_of(state: State) -> StateSpec:
    """The structure of a solve's state; refuses a state with no dimension besides the batch."""
    leaves, treespec = leaves_of(state)
    if all(leaf.dim() == 1 for leaf in leaves):
        shape = tuple(leaves[0].shape)
        raise ValueError(
            f"The fixed-point state has no dimension besides the batch (leaf 0 has shape {shape}), so nothing "
            f"says whether {shape[0]} is a batch or one sample's size. One sample of {shape[0]} numbers: pass "
            f"z0[None] (shape (1, {shape[0]})); {shape[0]} samples of one number each: pass z0[:, None]. (A "
            "1-D leaf is read as one number per sample only beside a leaf with more dimensions.)"
        )
    for i, leaf in enumerate(leaves):
        if not leaf.is_floating_point():
            raise TypeError(
                f"Leaf {i} of the state z0 is {leaf.dtype}: a fixed-point state is real floating point (an "
                "integer one has no gradient and rounds every step; complex ones are not supported). Start from "
                f"z0.float() or z0.double()."
            )
    return StateSpec(treespec, tuple(x.shape for x in leaves), tuple(x.dtype for x in leaves))


def solver_dtype(spec: StateSpec) -> torch.dtype:
    """The dtype of the solver's flat copy: the widest leaf dtype, and never below float32.

    Keeping history and least-squares solves in at least float32 makes Anderson and Broyden stable under
    autocast, where the cell itself may compute in bfloat16 or float16.
    """
    dtype = torch.float32
    for d in spec.dtypes:  # floating point: spec_of refuses any other
        dtype = torch.promote_types(dtype, d)
    return dtype


def flatten(state: State, spec: StateSpec) -> Tensor:
    """``[B, D]`` matrix holding every leaf of ``state`` (a view when the state is a single tensor)."""
    try:
        leaves, treespec = leaves_of(state)
        leaves = check_same_structure(spec, treespec, leaves, state)
    except (TypeError, ValueError) as err:
        if isinstance(state, tuple) and len(state) == 2 and pytree.tree_structure(state) != spec.treespec:
            raise type(err)(
                f"{err} (The cell returned a pair: if it is (state, aux), pass has_aux=True; with has_aux=True "
                "the state is the pair's first element.)"
            ) from None
        raise
    dtype = solver_dtype(spec)
    batch = spec.batch_size
    if len(leaves) == 1:
        return leaves[0].reshape(batch, -1).to(dtype)
    return torch.cat([x.reshape(batch, -1).to(dtype) for x in leaves], dim=1)


def unflatten(flat: Tensor, spec: StateSpec) -> State:
    """Inverse of :func:`flatten`: split the columns back into leaves of the original shapes and dtypes."""
    parts = flat.split(spec.sizes, dim=1) if len(spec.sizes) > 1 else (flat,)
    leaves = [p.reshape(shape).to(dtype) for p, shape, dtype in zip(parts, spec.shapes, spec.dtypes)]
    return pytree.tree_unflatten(leaves, spec.treespec)


def check_same_structure(
    spec: StateSpec, treespec: pytree.TreeSpec, leaves: list[Tensor], state: State
) -> list[Tensor]:
    """The leaves of ``state`` in ``spec``'s order; a clear error when its structure or shapes differ.

    A dict returned with the same keys in another order is the same structure (as for pytrees in general):
    its leaves are put back in the order of ``spec``.
    """
    if treespec != spec.treespec:
        leaves = _leaves_in_order_of(spec, state)
    for i, (leaf, shape, dtype) in enumerate(zip(leaves, spec.shapes, spec.dtypes)):
        if leaf.shape != shape:
            raise ValueError(
                f"The cell changed the shape of state leaf {i}: input {tuple(shape)}, output "
                f"{tuple(leaf.shape)}. A fixed-point cell must return every tensor with its input's shape."
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"The cell returned state leaf {i} in {leaf.dtype}: a fixed-point state is floating point (an "
                f"integer one has no gradient, and rounds every step). Return {dtype}."
            )
        # A narrower output is autocast at work; a wider one would be rounded to the state's dtype every step.
        if leaf.dtype != dtype and torch.promote_types(leaf.dtype, dtype) == leaf.dtype:
            raise TypeError(
                f"The cell returned state leaf {i} in {leaf.dtype} for a {dtype} state, so every step would be "
                f"rounded to {dtype}: start from a {leaf.dtype} state (z0.to({leaf.dtype})) or return {dtype}."
            )
    return leaves


def output_leaves(output: State, spec: StateSpec) -> list[Tensor]:
    """The leaves of a cell's output in the order of the state's ``spec`` (checked as by
    :func:`check_same_structure`): a dict returned in another key order is read key by key."""
    leaves, treespec = leaves_of(output)
    return check_same_structure(spec, treespec, leaves, output)


def _leaves_in_order_of(spec: StateSpec, state: State) -> list[Tensor]:
    """Match leaves by their key paths (dict keys, indices); raise when the paths differ."""
    found = dict(pytree.tree_flatten_with_path(state)[0])
    template = pytree.tree_unflatten([0] * len(spec.shapes), spec.treespec)
    wanted = [path for path, _ in pytree.tree_flatten_with_path(template)[0]]
    if set(found) != set(wanted) or len(found) != len(wanted):
        raise ValueError(
            "The cell returned a state with a different structure than it was given: expected "
            f"{spec.treespec}, got {pytree.tree_structure(state)}. A fixed-point cell must map a state to a "
            "state of the same structure (same container types, keys and number of tensors)."
        )
    return [found[path] for path in wanted]


def tree_map(fn, *states: State) -> State:
    return pytree.tree_map(fn, *states)
