"""Fixed-point solvers: one file each, all strategies run by the one loop in ``loop.py``."""

from .anderson import Anderson
from .base import Solver
from .broyden import Broyden
from .fixed_point_iteration import FixedPointIteration
from .loop import SolveResult, iterate

__all__ = ["Anderson", "Broyden", "FixedPointIteration", "SolveResult", "Solver", "iterate"]
