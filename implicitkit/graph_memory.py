"""Measure the memory that autograd graphs hold, exactly and on any device."""

from __future__ import annotations

import torch
from torch import Tensor


class GraphMemory:
    """Context manager counting the bytes of tensors saved for backward, live and at peak.

    Every tensor an operation saves for its backward pass is counted from when it is saved until its graph
    is freed (by a backward pass without ``retain_graph``, or when the graph is dropped). Tensors that share
    storage count once, and a saved view counts its whole base storage, which it keeps alive. This is the memory a graph adds on top of the model, so comparing ``peak_bytes``
    across training-step variants shows whether memory grows with, say, the number of supervised branches;
    unlike allocator statistics it is deterministic and the same on CPU and GPU.

    Example::

        with GraphMemory() as mem:
            loss = model(x).sum()
            loss.backward()
        print(mem.peak_bytes, mem.live_bytes)  # live_bytes is 0 once every graph is freed

    Attributes:
        live_bytes: bytes held by saved tensors now.
        peak_bytes: the most held at once since entering.
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [saved references, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> GraphMemory:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: Tensor) -> _Saved:
        return _Saved(tensor, self)

    def _add(self, key: int, nbytes: int) -> None:
        entry = self._refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1

    def _remove(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[key]


class _Saved:
    """A saved tensor and its accounting; the graph drops it (and so the count) when it is freed."""

    __slots__ = ("key", "meter", "tensor", "version")

    def __init__(self, tensor: Tensor, meter: GraphMemory) -> None:
        self.tensor, self.meter = tensor, meter
        self.version = None if tensor.is_inference() else tensor._version
        storage = tensor.untyped_storage()
        self.key = storage.data_ptr() if storage.nbytes() else id(tensor)
        meter._add(self.key, storage.nbytes())

    def __del__(self) -> None:
        self.meter._remove(self.key)


def _unpack(saved: _Saved) -> Tensor:
    # Saved-tensor hooks take over autograd's own check of in-place changes; without it, backward would
    # silently use the changed values.
    if saved.version is not None and saved.tensor._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"a tensor of shape {list(saved.tensor.shape)} saved at version {saved.version} is now at version "
            f"{saved.tensor._version} (GraphMemory keeps autograd's check). Compute the changed value out of "
            "place (y = y * 2, not y.mul_(2))."
        )
    return saved.tensor
