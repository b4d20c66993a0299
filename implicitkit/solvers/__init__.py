"""Fixed-point solvers: one file each, all behind :class:`Solver`'s loop."""

from .anderson import Anderson
from .base import Solver, SolveResult
from .broyden import Broyden
from .fixed_point_iteration import FixedPointIteration

__all__ = ["Anderson", "Broyden", "FixedPointIteration", "SolveResult", "Solver"]
