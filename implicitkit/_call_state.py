"""What a ``fixed_point`` call's lazily built outputs must be built under: its modes, and its parameters.

``Solution.value`` is built when first read and then kept, and path branches when accessed; that may come
after the call: in a ``no_grad`` or ``inference_mode`` log line, outside the ``autocast`` block, or after
an optimizer step. The modes of the call are restored for the value here; a step cannot be undone (``f``
reads its parameters as they are), so an output whose graph reaches a parameter that an optimizer stepped
since the call is refused.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

_steps = 0  # optimizer steps in this process
_last_step_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its last step's count


def _count_step(optimizer, args, kwargs) -> None:
    global _steps
    _steps += 1
    _last_step_of[optimizer] = _steps


register_optimizer_step_pre_hook(_count_step)

_AUTOCAST_DEVICES = ("cpu", "cuda")


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

    def check(self, built: object, what: str) -> None:
        """Refuse `built` (a state built now) if an optimizer stepped, since the call, a parameter it reads.

        Only when some optimizer stepped does this look further: at the leaves of `built`'s graph. From a
        solve without autograd nothing tells which parameters ``f`` read, so any step refuses.
        """
        if _steps == self.steps:
            return
        stepped = [o for o, n in list(_last_step_of.items()) if n > self.steps]
        if not stepped:
            return
        leaves = _graph_leaves(built)
        if leaves is None and self.grad_enabled:
            return  # built with autograd on and no graph: f read no tensor that requires grad
        if leaves is None or any(
            id(p) in leaves for o in stepped for g in o.param_groups for p in g["params"]
        ):
            raise RuntimeError(
                f"{what} is built when it is read, from f's parameters as they are then, and an optimizer has "
                "stepped them since the fixed_point call: it would not be the solve's. Read it before "
                "optimizer.step(), or use Solution.last (the solver's final iterate, detached)."
            )


def _graph_leaves(built: object) -> set[int] | None:
    """The ids of the leaf tensors that `built`'s graph accumulates into; None if it has no graph."""
    roots = [t.grad_fn for t in torch.utils._pytree.tree_leaves(built) if isinstance(t, Tensor)]
    roots = [r for r in roots if r is not None]
    if not roots:
        return None
    leaves: set[int] = set()
    seen: set[int] = set()
    while roots:
        node = roots.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        roots.extend(n for n, _ in node.next_functions if n is not None)
    return leaves
