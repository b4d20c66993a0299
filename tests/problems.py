"""Problems with known answers shared by the core tests."""

from __future__ import annotations

import torch


def contraction(dim: int, rate: float, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A random ``dim x dim`` matrix with spectral norm exactly ``rate``."""
    a = torch.randn(dim, dim, generator=generator, dtype=dtype)
    return rate * a / torch.linalg.matrix_norm(a, ord=2)
