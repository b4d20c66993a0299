"""Solvers of the linear system ``A x = b`` per sample, for adjoints solved as linear systems (``IFT(solver=...)``)."""

from .base import IterativeLinearSolver, LinearSolver
from .cg import CG
from .direct import DirectSolve
from .gmres import GMRES

__all__ = ["CG", "GMRES", "DirectSolve", "IterativeLinearSolver", "LinearSolver"]
