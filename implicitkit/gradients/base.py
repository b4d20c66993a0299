"""The gradient-estimator protocol: how a gradient is attached to a fixed point found without one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from torch import Tensor

from .._tree import State
from ..stats import SolverStats

Map = Callable[[State], State]
VJP = Callable[[Tensor], Tensor]
Recorder = Callable[[SolverStats], None]


class GradientEstimator(ABC):
    """Turns a detached fixed point ``z*`` into a state whose backward is the chosen gradient estimate.

    With ``g = dL/dz*`` and ``J = df/dz`` at ``z*``, the exact gradient is ``g (I - J)^-1 df/dtheta``; each
    estimator replaces ``(I - J)^-1`` by something cheaper (see ``docs/gradients.md``).

    Subclasses implement :meth:`attach`. An estimator whose backward is ``u df/dtheta`` for an adjoint
    vector ``u`` that is a fixed polynomial in ``J`` (JFB, Neumann) also implements :meth:`adjoint_vector`,
    which lets :class:`~implicitkit.IFT` use it as a fallback inside its backward pass.
    """

    #: True when the solver itself must run with autograd on (backprop through the solver's steps).
    unrolled: bool = False

    @abstractmethod
    def attach(self, f: Map, z_star: State, record: Recorder | None = None) -> State:
        """Return a state numerically (close to) ``z_star`` whose graph carries this estimator's gradient.

        Arguments:
            f: the map ``z -> f(z, x; theta)`` with autograd to its parameters and inputs.
            z_star: the detached fixed point, a state of any supported structure.
            record: called with the stats of any solve done in the backward pass (IFT's adjoint solve).
        """

    def adjoint_vector(self, g: Tensor, vjp: VJP) -> Tensor:
        """The adjoint ``u`` (flat ``[B, D]``) such that this estimator's gradient is ``u df/dtheta``."""
        raise TypeError(
            f"{type(self).__name__} is not a polynomial in J and cannot serve as IFT's fallback; "
            "use JFB() or Neumann(k)."
        )

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if not k.startswith("_")]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"
