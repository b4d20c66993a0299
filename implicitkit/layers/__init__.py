"""Layers that are safe inside a DEQ cell: their randomness and normalisation are fixed within a solve."""

from .dropout import VariationalDropout
from .per_solve import OncePerSolve, PerSolve, SolveScope, new_solve
from .spectral_norm import SpectralNorm, spectral_norm
from .weight_norm import WeightNorm, weight_norm

__all__ = [
    "OncePerSolve",
    "PerSolve",
    "SolveScope",
    "SpectralNorm",
    "VariationalDropout",
    "WeightNorm",
    "new_solve",
    "spectral_norm",
    "weight_norm",
]
