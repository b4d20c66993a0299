"""Shared problems with known answers for the core tests."""

from __future__ import annotations

import pytest
import torch


def contraction(dim: int, rate: float, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random ``dim x dim`` matrix with spectral norm exactly ``rate``."""
    a = torch.randn(dim, dim, generator=generator, dtype=dtype)
    return rate * a / torch.linalg.matrix_norm(a, ord=2)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
