"""Host memory that training steps can reuse: glibc's malloc told to keep freed blocks.

A training step on the CPU allocates and frees the same large tensors every step (activations, their
gradients, the zero-filled gradients of sampled feature maps). By default glibc's malloc serves blocks
above a moving threshold with fresh ``mmap`` pages and trims the top of its heap once enough is free, so
every step pays the kernel to map and zero those pages again on first touch: about 6,000 page faults per
step of the digits demo, 5-8% of its time (docs/benchmarks.md). Two ``mallopt`` settings keep the
memory inside the process instead, the remedy PyTorch's CPU tuning guide reaches with jemalloc or
tcmalloc, without a preloaded library:

- ``M_MMAP_THRESHOLD`` at its maximum (32 MiB on 64-bit glibc): blocks below it come from the heap, and
  the threshold stops moving;
- ``M_TRIM_THRESHOLD`` out of reach: freed heap memory is kept for the next step.

The price is memory the process holds past its peak use: 5-7% more peak RSS on the digits demo.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

__all__ = ["keep_freed_host_memory"]

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit systems (HEAP_MAX_SIZE / 2)
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only once 2 GiB at the heap's top are free


@functools.cache
def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring); once per process.

    Does nothing, and returns False, where the C library is not glibc or the user tunes malloc already
    (``MALLOC_*`` or ``GLIBC_TUNABLES`` in the environment, or another allocator in ``LD_PRELOAD``).

    Returns:
        Whether the settings are in force.
    """
    if not sys.platform.startswith("linux") or _user_tunes_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl has mallopt, but ignores it)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )


def _user_tunes_malloc() -> bool:
    env = os.environ
    return any(key.startswith("MALLOC_") for key in env) or bool(
        env.get("GLIBC_TUNABLES") or env.get("LD_PRELOAD")
    )
