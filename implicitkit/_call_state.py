"""What a ``fixed_point`` call's lazily built value must be built under: its grad mode, autocast and weights.

``Solution.value`` is built when first read and then kept, and that read may come after the call: in a
``no_grad`` log line, outside the ``autocast`` block, or after an optimizer step. The first two are restored
here; the last cannot be undone (``f`` reads its parameters as they are), so it is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

_optimizer_steps = 0


def _count_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_pre_hook(_count_step)

_AUTOCAST_DEVICES = ("cpu", "cuda")


class CallState:
    """The state of the moment of a call, to build its outputs under later."""

    def __init__(self, device_type: str) -> None:
        self.grad_enabled = torch.is_grad_enabled()
        devices = [
            d for d in dict.fromkeys((*_AUTOCAST_DEVICES, device_type)) if torch.amp.is_autocast_available(d)
        ]
        self.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices]
        self.optimizer_steps = _optimizer_steps

    @contextlib.contextmanager
    def restored(self, what: str) -> Iterator[None]:
        """Run the block as the call would have, or refuse if an optimizer stepped since the call."""
        if _optimizer_steps != self.optimizer_steps:
            raise RuntimeError(
                f"{what} is built when first read, from f's parameters as they are then, and an optimizer has "
                "stepped since the fixed_point call: it would not be the solve's. Read it before "
                "optimizer.step(), or use Solution.last (the solver's final iterate, detached)."
            )
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            for device, enabled, dtype in self.autocast:
                if (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) != (enabled, dtype):
                    stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            yield
