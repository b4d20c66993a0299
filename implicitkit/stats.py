"""What a solve reports: per-sample step counts, residuals, convergence and failure causes."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


class FixedPointError(RuntimeError):
    """Raised by a solver created with ``throw=True`` when some sample did not converge."""


@dataclass
class SolverStats:
    """Per-sample outcome of a fixed-point solve.

    Every tensor field has shape ``[B]`` except ``trace``, which is ``[T, B]``: the residual of each sample
    at each of the ``T`` steps taken (a sample that stopped early repeats its last value).

    Attributes:
        nstep: number of steps (applications of the map) each sample used.
        residual: the lowest residual seen, under the solver's stop mode; it belongs to the returned value.
        converged: ``residual <= tol``.
        diverged: the residual grew past ``divergence_factor`` times its first value.
        nonfinite: the map produced NaN or inf for this sample.
        tol, stop_mode, max_iter: the rule the solve was judged by.
    """

    nstep: Tensor
    residual: Tensor
    converged: Tensor
    diverged: Tensor
    nonfinite: Tensor
    trace: Tensor
    tol: float
    stop_mode: str
    max_iter: int
    solver: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def failure_message(self) -> str | None:
        """A message naming what went wrong, how often, and what to try; ``None`` when all converged."""
        if self.all_converged:
            return None
        batch = self.converged.numel()
        parts = []
        n_nan = int(self.nonfinite.sum())
        if n_nan:
            parts.append(
                f"{n_nan}/{batch} samples produced NaN or inf: check the inputs and initial state for NaN, and "
                "the cell for overflow (lower the learning rate, add normalisation, or use float32)"
            )
        n_div = int((self.diverged & ~self.nonfinite).sum())
        if n_div:
            parts.append(
                f"{n_div}/{batch} samples diverged (residual grew over {self.extra.get('divergence_factor')}x): "
                "the map is likely not contractive; add damping, normalisation or a Jacobian regulariser"
            )
        n_slow = int((~self.converged & ~self.diverged & ~self.nonfinite).sum())
        if n_slow:
            worst = float(self.residual[~self.converged & ~self.diverged & ~self.nonfinite].max())
            parts.append(
                f"{n_slow}/{batch} samples did not reach tol={self.tol:g} ({self.stop_mode}) within "
                f"max_iter={self.max_iter} (worst residual {worst:.3g}): raise max_iter, loosen tol, or use "
                "Anderson/Broyden"
            )
        return f"{self.solver or 'fixed-point solve'}: " + "; ".join(parts) + "."

    def summary(self) -> str:
        """One line: steps (mean/max), residual (max) and how many samples converged."""
        n = self.converged.numel()
        return (
            f"{self.solver}: steps mean {self.nstep.float().mean():.1f} max {int(self.nstep.max())}, "
            f"residual max {float(self.residual.max()):.2e} ({self.stop_mode}), "
            f"converged {int(self.converged.sum())}/{n}"
        )

    def __repr__(self) -> str:
        return f"SolverStats({self.summary()})"
