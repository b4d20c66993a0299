"""Fixtures for the core tests (shared problems live in ``problems.py``: conftest is not importable by name)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# Each pytest-xdist worker gets one thread: on a 2-core runner two workers with two threads each
# oversubscribe the cores, and the small tensors here gain nothing from intra-op parallelism.
torch.set_num_threads(1)
