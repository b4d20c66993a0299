"""What a solve reports: per-sample result codes whose text says what failed and what to do, and stats."""

from __future__ import annotations

import enum
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


class Result(enum.IntEnum):
    """The outcome of one sample's solve; ``SolverStats.result`` holds one code per sample.

    Each code's :attr:`message` is what a user needs: what happened, the likely causes and the fix.
    """

    successful = 0
    max_steps_reached = 1
    diverged = 2
    nonfinite = 3

    @property
    def message(self) -> str:
        return _MESSAGES[self]


#: What to try when samples ran out of steps; the last is dropped when the solver is already one of those.
_MAX_STEPS_REMEDIES = ("raise max_iter", "loosen tol", "use Anderson/Broyden")
_STALL_ADVICE = (
    "if the residual stalls, the map may not be contractive here (add damping or a Jacobian regulariser)"
)


def _max_steps_fix(solver: str) -> str:
    """The advice for samples that ran out of steps, without the remedy the solver already is."""
    remedies = _MAX_STEPS_REMEDIES[:-1] if solver in ("Anderson", "Broyden") else _MAX_STEPS_REMEDIES
    either = ", ".join(remedies[:-1]) + ("," if len(remedies) > 2 else "") + " or " + remedies[-1]
    return f"{either}; {_STALL_ADVICE}"


_MESSAGES = {
    Result.successful: "reached the tolerance (or, with tol=None, took its max_iter steps)",
    Result.max_steps_reached: "did not reach tol within max_iter: " + _max_steps_fix(""),
    Result.diverged: (
        "diverged (the residual or the state's norm grew past divergence_factor times its first value, or "
        "the state grew 100-fold while the residual did not shrink): the map is likely not contractive here "
        "or has no fixed point; add damping, normalisation or a Jacobian regulariser (if the fixed point "
        "really lies that far from z0, raise divergence_factor)"
    ),
    Result.nonfinite: (
        "produced NaN or inf: check the inputs and initial state for NaN, and the cell for overflow (lower "
        "the learning rate, add normalisation, or compute in float32)"
    ),
}


class FixedPointWarning(RuntimeWarning):
    """Some samples of a solve failed under a warning failure policy (the default ``on_failure="warn"``).

    Shown once per call site and kind of failure; filter it like any warning, e.g.
    ``warnings.simplefilter("error", ik.FixedPointWarning)``, or pass ``on_failure="report"``.
    """


class FixedPointError(RuntimeError):
    """A solve failed under a raising failure policy (``throw=True``, ``IFT(on_failure="raise")``).

    Attributes:
        stats: the :class:`SolverStats` of the failed solve, for inspection.
    """

    def __init__(self, message: str, stats: SolverStats | None = None) -> None:
        super().__init__(message)
        self.stats = stats


@dataclass
class SolverStats:
    """Per-sample outcome of a fixed-point solve.

    Every tensor field has shape ``[B]`` except ``trace``, which is ``[T, B]``: the residual of each sample
    at each of the ``T`` steps taken (a sample that stopped early repeats its best value).

    Attributes:
        nstep: number of steps (applications of the map) each sample used.
        residual: the lowest residual seen, under the solver's stop mode; it belongs to the returned value.
        result: a :class:`Result` code per sample (int8).
        trace: the residuals step by step.
        tol, stop_mode, max_iter: the rule the solve was judged by (``tol=None``: a fixed step count).
        divergence_factor: the growth of the residual at which a sample counts as diverged.
        solver: the solver's name, used in messages.
        autocast_dtype: the autocast precision the map ran under, or None (for the failure advice).
    """

    nstep: Tensor
    residual: Tensor
    result: Tensor
    trace: Tensor
    tol: float | None
    stop_mode: str
    max_iter: int
    divergence_factor: float
    solver: str = ""
    autocast_dtype: torch.dtype | None = None

    @property
    def converged(self) -> Tensor:
        """``[B]``: the sample's result is :attr:`Result.successful`."""
        return self.result == Result.successful

    @property
    def diverged(self) -> Tensor:
        return self.result == Result.diverged

    @property
    def nonfinite(self) -> Tensor:
        return self.result == Result.nonfinite

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def message(self, sample: int) -> str:
        """One sample's outcome in words."""
        return f"{self.solver}: sample {sample} {Result(int(self.result[sample])).message}."

    def failure_message(self) -> str | None:
        """The failures by cause, with counts and the fix; ``None`` when every sample succeeded."""
        counts = torch.bincount(self.result.long(), minlength=len(Result)).tolist()
        batch = self.result.numel()
        parts = []
        for code in (Result.nonfinite, Result.diverged, Result.max_steps_reached):
            if counts[code]:
                text = code.message
                if code == Result.max_steps_reached:
                    worst = float(self.residual[self.result == code].max())
                    # "Anderson", or "IFT adjoint (Anderson)" for an adjoint: the solver is the last name
                    solver = self.solver.rstrip(")").rpartition("(")[2]
                    what, fix = text.partition(": ")[0], _max_steps_fix(solver)
                    if self.autocast_dtype is not None:
                        digits = -math.log10(torch.finfo(self.autocast_dtype).eps)
                        fix += (
                            f"; the cell ran under autocast in {str(self.autocast_dtype).removeprefix('torch.')}, "
                            f"whose rounding (about {digits:.0f} digits) can keep the residual above a tight tol"
                        )
                    text = (
                        f"{what} (tol={self.tol:g} {self.stop_mode}, max_iter={self.max_iter}, worst "
                        f"residual {worst:.3g}): {fix}"
                    )
                parts.append(f"{counts[code]}/{batch} samples {text}")
        if not parts:
            return None
        return f"{self.solver or 'fixed-point solve'}: " + "; ".join(parts) + "."

    def summary(self) -> str:
        """One line: steps (mean/max), residual (max) and how many samples succeeded."""
        n = self.result.numel()
        if n == 0:
            return f"{self.solver}: empty batch"
        return (
            f"{self.solver}: steps mean {self.nstep.float().mean():.1f} max {int(self.nstep.max())}, "
            f"residual max {float(self.residual.max()):.2e} ({self.stop_mode}), "
            f"converged {int(self.converged.sum())}/{n}"
        )

    def __repr__(self) -> str:
        return f"SolverStats({self.summary()})"


@dataclass(repr=False)
class AdjointStats(SolverStats):
    """Stats of a backward (adjoint) solve, with what the samples that failed received instead.

    Attributes:
        fell_back: ``[B]`` bool, the samples whose adjoint did not converge and were handled by the
            estimator's failure policy.
        fallback: what those samples received: ``None`` (no sample failed), ``"best_iterate"`` (the best
            adjoint iterate, ``on_failure="warn"``) or the fallback estimator's name (``"JFB"``, ``"Neumann"``).
    """

    fell_back: Tensor | None = None
    fallback: str | None = None


#: What a solve may do when samples fail: keep it in the stats, warn, or raise (``on_failure=``).
FAILURE_POLICIES = ("report", "warn", "raise")


def apply_failure_policy(policy: str, stats: SolverStats) -> None:
    """Act on a forward solve's failures: ``"report"`` nothing, ``"warn"`` a :class:`FixedPointWarning`
    attributed to the caller, ``"raise"`` a :class:`FixedPointError`; each with the counts, cause and fix."""
    if policy == "report" or stats.all_converged:
        return
    if policy == "raise":
        raise FixedPointError(stats.failure_message(), stats)
    warn_at_call_site(
        f"{stats.failure_message()} Pass on_failure='report' to the solver to keep failures in the stats "
        "only, or on_failure='raise' to stop with a FixedPointError.",
        key=tuple(sorted(set(stats.result.tolist()))),
    )


# With the separator: ".../implicitkit" alone is also the start of ".../implicitkit_det/..." (and
# ".../torch" of ".../torchvision/..."), whose calls are call sites of their own.
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_WARNED: set[tuple] = set()


def warn_at_call_site(message: str, key: tuple = ()) -> None:
    """Issue a :class:`FixedPointWarning` attributed to the first frame outside implicitkit and torch.

    Shown once per call site and ``key`` (the kinds of failure), whatever the counts in the text, unless a
    warnings filter asks for every occurrence (``"always"``, ``"error"``, as ``pytest.warns`` does). A call
    under an ``"ignore"`` filter shows nothing and so does not use up the site.
    """
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    site = (frame.f_code.co_filename, frame.f_lineno, key)
    action = _filter_action(message, frame)
    if action == "ignore" or (site in _WARNED and action not in ("always", "error")):
        return
    _WARNED.add(site)  # only now: the warning is issued
    warnings.warn(message, FixedPointWarning, stacklevel=level)


def _filter_action(message: str, frame) -> str:
    """The action the warnings filters give a FixedPointWarning with this text raised at ``frame``."""
    module = frame.f_globals.get("__name__", "")
    for action, text, category, module_pattern, lineno in warnings.filters:
        if (
            (text is None or text.match(message))
            and issubclass(FixedPointWarning, category)
            and (module_pattern is None or module_pattern.match(module))
            and lineno in (0, frame.f_lineno)
        ):
            return action
    return warnings.defaultaction
