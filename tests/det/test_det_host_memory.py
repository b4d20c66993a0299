"""Host memory kept for reuse (glibc's malloc settings a training run applies): page faults, opt-outs."""

import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

# Allocates and frees 16 tensors of 4 MiB, ten times after a warm-up, and prints the page faults per round.
_ROUNDS = """
import resource, sys, torch
from implicitkit_det.engine.host_memory import keep_freed_host_memory
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):
    [torch.ones(1 << 20) for _ in range(16)]
start = faults()
for _ in range(10):
    [torch.ones(1 << 20) for _ in range(16)]
print(kept, (faults() - start) / 10)
"""


def _rounds(mode: str, **env: str) -> tuple[str, float]:
    user_tuning = ("LD_PRELOAD", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in user_tuning}
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], float(out[1])


@glibc_only
def test_freed_memory_is_reused_without_new_page_faults():
    # 64 MiB freed each round: with the settings every round reuses the same pages.
    for _ in range(2):
        kept, faults = _rounds("keep")
        assert kept == "True" and faults < 1000
    # glibc's default returns the memory to the kernel when the freed blocks sit at the heap's top, and the
    # next round faults every page in again (16,384 pages of 4 KiB); where they land depends on the
    # process's earlier allocations, so the default faults in most processes, not in every one.
    assert any(_rounds("default")[1] > 8000 for _ in range(4))


@glibc_only
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_ARENA_MAX": "2"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
        {"LD_PRELOAD": "libc.so.6"},
    ],
)
def test_a_user_tuned_malloc_is_left_alone(env):
    assert _rounds("keep", **env)[0] == "False"
