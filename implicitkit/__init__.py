"""implicitkit: implicit (deep-equilibrium) layers for PyTorch.

Three small decisions, three kinds of objects: a solver finds ``z* = f(z*)``, a gradient estimator
attaches a gradient to it, and an optional perturbation disturbs the path while training.
"""

from .deq import DEQ
from .diagnostics import GradientAudit, gradient_audit, spectral_radius
from .functional import fixed_point
from .gradients import (
    IFT,
    JFB,
    RAG,
    GradientEstimator,
    Neumann,
    Phantom,
    PolynomialAdjoint,
    Reversible,
    ReversibleStats,
    Unrolled,
)
from .graph_memory import GraphMemory
from .layers import PerSolve, SolveScope, VariationalDropout, new_solve, spectral_norm, weight_norm
from .linear_solvers import CG, GMRES, DirectSolve, LinearSolver
from .linearize import Linearization
from .perturbation import GaussianPerturbation, Perturbation
from .regularize import jacobian_frobenius
from .shared_inputs import SharedInputs
from .solution import Path, Solution
from .solvers import Anderson, Broyden, FixedPointIteration, Solver
from .stats import AdjointStats, FixedPointError, FixedPointWarning, Result, SolverStats

__version__ = "0.1.0"

__all__ = [
    "CG",
    "DEQ",
    "GMRES",
    "IFT",
    "JFB",
    "RAG",
    "AdjointStats",
    "Anderson",
    "Broyden",
    "DirectSolve",
    "FixedPointError",
    "FixedPointIteration",
    "FixedPointWarning",
    "GaussianPerturbation",
    "GradientAudit",
    "GradientEstimator",
    "GraphMemory",
    "LinearSolver",
    "Linearization",
    "Neumann",
    "Path",
    "PerSolve",
    "Perturbation",
    "Phantom",
    "PolynomialAdjoint",
    "Result",
    "Reversible",
    "ReversibleStats",
    "SharedInputs",
    "Solution",
    "SolveScope",
    "Solver",
    "SolverStats",
    "Unrolled",
    "VariationalDropout",
    "fixed_point",
    "gradient_audit",
    "jacobian_frobenius",
    "new_solve",
    "spectral_norm",
    "spectral_radius",
    "weight_norm",
]
