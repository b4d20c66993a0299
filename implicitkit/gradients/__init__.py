"""Gradient estimators: one file each, all behind :class:`GradientEstimator`."""

from .base import GradientEstimator, PolynomialAdjoint
from .ift import IFT
from .jfb import JFB
from .neumann import Neumann
from .phantom import Phantom
from .rag import RAG
from .reversible import Reversible, ReversibleStats
from .unrolled import Unrolled

__all__ = [
    "IFT",
    "JFB",
    "RAG",
    "GradientEstimator",
    "Neumann",
    "Phantom",
    "PolynomialAdjoint",
    "Reversible",
    "ReversibleStats",
    "Unrolled",
]
