"""What a ``fixed_point`` call's lazily built outputs must be built under: its modes, and its parameters.

``Solution.value`` is built when first read and then kept, and path branches when accessed; that may come
after the call: in a ``no_grad`` or ``inference_mode`` log line, outside the ``autocast`` block, or after
an optimizer step. The modes of the call are restored for the value here; a step cannot be undone (``f``
reads its parameters as they are), so an output whose graph reaches a parameter that an optimizer stepped
since the call is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

_steps = 0  # optimizer steps in this process
_last_step_of: dict[int, int] = {}  # id of a parameter an optimizer stepped -> that step's count


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1
    # By parameter, not by optimizer: one made for a single step is gone by the time a value is read.
    _last_step_of.update(dict.fromkeys((id(p) for g in optimizer.param_groups for p in g["params"]), _steps))


register_optimizer_step_pre_hook(_count_step)

_AUTOCAST_DEVICES = ("cpu", "cuda")
T = TypeVar("T")


class CallState:
    """The state of the moment of a call, to build its outputs under later."""

    def __init__(self, device_type: str) -> None:
        self.grad_enabled = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        devices = [
            d for d in dict.fromkeys((*_AUTOCAST_DEVICES, device_type)) if torch.amp.is_autocast_available(d)
        ]
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]
        self.steps = _steps
        self.first_node = _next_sequence_nr()  # graph nodes made from here on are the solve's outputs'

    @contextlib.contextmanager
    def modes(self) -> Iterator[None]:
        """The grad mode, inference mode and autocast of the call."""
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled() != self.inference:
                stack.enter_context(torch.inference_mode(self.inference))
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            for device, enabled, dtype in self.autocast:
                if (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) != (enabled, dtype):
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            yield

    def build(self, make: Callable[[], T], what: str) -> T:
        """``make()`` under the call's modes (the value, built once), or a refusal (:meth:`_checked`)."""
        with self.modes():
            return self._checked(make, what, self.grad_enabled, self.inference)

    def branch(self, make: Callable[[], T], what: str) -> T:
        """``make()`` under the modes of now (a path branch, built at each access), or a refusal."""
        return self._checked(make, what, torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def _checked(self, make: Callable[[], T], what: str, grad: bool, inference: bool) -> T:
        """``make()``, refused if an optimizer stepped, since the call, a parameter it reads.

        Only when some optimizer stepped does this look further: at the parameters the output's graph reads
        directly (not through a tensor made before the call, such as an encoder's output that ``f`` closes
        over: stepping the encoder changes neither). Without autograd there is no graph to look at, so the
        output is then built once with it, looked at, and handed back without its graph; under inference
        mode none can be built, and any step refuses.
        """
        if _steps == self.steps:
            return make()
        probe = not grad and not inference
        with torch.enable_grad() if probe else contextlib.nullcontext():
            built = make()
        leaves = _graph_leaves(built, self.first_node)
        if leaves is None and not inference:
            leaves = set()  # built with autograd and no graph: f read no tensor that requires grad
        if leaves is None or any(_last_step_of.get(leaf, 0) > self.steps for leaf in leaves):
            raise RuntimeError(
                f"{what} is built when it is read, from f's parameters as they are then, and an optimizer has "
                "stepped them since the fixed_point call: it would not be the solve's. Read it before "
                "optimizer.step(), or use Solution.last (the solver's final iterate, detached)."
            )
        if probe:
            built = torch.utils._pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, built)
        return built


def _next_sequence_nr() -> int:
    """The sequence number autograd gives the next node it makes in this thread (0 where it makes none)."""
    if torch.is_inference_mode_enabled():
        return 0
    with torch.enable_grad():
        return (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr() + 1


def _graph_leaves(built: object, first_node: int) -> set[int] | None:
    """The ids of the leaf tensors that `built`'s graph accumulates into, through nodes numbered from
    `first_node` on (leaves' own nodes are numbered last of all); None if `built` has no graph."""
    roots = [t.grad_fn for t in torch.utils._pytree.tree_leaves(built) if isinstance(t, Tensor)]
    roots = [r for r in roots if r is not None]
    if not roots:
        return None
    leaves: set[int] = set()
    seen: set[int] = set()
    while roots:
        node = roots.pop()
        if id(node) in seen or node._sequence_nr() < first_node:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        roots.extend(n for n, _ in node.next_functions if n is not None)
    return leaves
