"""implicitkit: implicit (deep-equilibrium) layers for PyTorch.

Three small decisions, three kinds of objects: a solver finds ``z* = f(z*)``, a gradient estimator
attaches a gradient to it, and an optional perturbation disturbs the path while training.
"""

from .deq import DEQ
from .functional import fixed_point
from .gradients import IFT, JFB, RAG, GradientEstimator, Neumann, Phantom, Unrolled
from .solution import Path, Solution
from .solvers import Anderson, Broyden, FixedPointIteration, Solver
from .stats import FixedPointError, SolverStats

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "IFT",
    "JFB",
    "RAG",
    "Anderson",
    "Broyden",
    "FixedPointError",
    "FixedPointIteration",
    "GradientEstimator",
    "Neumann",
    "Path",
    "Phantom",
    "Solution",
    "Solver",
    "SolverStats",
    "Unrolled",
    "fixed_point",
]
