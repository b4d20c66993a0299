"""Restarted GMRES, batched: every sample its own Krylov space and stop rule."""

from __future__ import annotations

import torch

from .._settings import as_count
from .base import IterativeLinearSolver


class GMRES(IterativeLinearSolver):
    """GMRES(m): minimise ``||b - A x||`` over ``x_0 + span{r_0, A r_0, ..., A^{k-1} r_0}``, restarted every ``m``.

    The Arnoldi basis is built with modified Gram-Schmidt for all samples at once; after each product every
    sample's small least-squares problem ``min_y ||beta e_1 - H y||`` gives its residual, and a sample whose
    residual met ``tol`` keeps its solution from then on (it is not moved by the others' iterations), once one
    more product confirms that its true residual ``||b - A x||`` met ``tol`` too (else it restarts from there:
    :class:`~implicitkit.linear_solvers.base.IterativeLinearSolver`); one whose data turn NaN or inf is
    stopped with its last finite iterate and reported as ``nonfinite``. Unlike
    the adjoint as a fixed point (``u = u J + g``), GMRES converges whenever ``I - J`` is invertible, also when
    ``J`` has eigenvalues on or outside the unit circle, in at most ``D`` products without restarts.

    Arguments:
        restart: ``m``, the Krylov dimension before a restart (memory ``m + 1`` vectors per sample).
        **kwargs: ``tol``, ``max_iter`` (products with ``A``), ``stop_mode`` of :class:`LinearSolver`.

    Reference: Saad & Schultz, "GMRES: a generalized minimal residual algorithm", SIAM J. Sci. Stat. Comput. 1986.
    """

    def __init__(self, *, restart: int = 20, **kwargs) -> None:
        super().__init__(**kwargs)
        restart = as_count("restart", restart)
        if restart < 1:
            raise ValueError(f"restart must be at least 1, got {restart}.")
        self.restart = restart

    def _iterate(self, apply, apply_transposed, b_norm, x, r, done, nstep, trace, products):
        """One restart cycle of at most ``m`` products from ``x``, whose residual is ``r``.

        A sample whose data turn NaN or inf (right-hand side, residual or a Hessenberg column) is reported
        with a NaN residual and marked done; the least-squares problems of done samples are replaced by the
        finite ``min ||0 - [I; 0] y||`` (``y = 0``), so one bad sample neither breaks ``lstsq`` for the batch
        nor moves the others.
        """
        beta = torch.linalg.vector_norm(r, dim=1)
        tiny = torch.finfo(r.dtype).tiny
        basis = [r / beta.clamp_min(tiny)[:, None]]
        h = r.new_zeros(r.shape[0], self.restart + 1, self.restart)
        rhs = r.new_zeros(r.shape[0], self.restart + 1)
        rhs[:, 0] = beta
        finite = torch.isfinite(beta)
        eye = torch.eye(self.restart + 1, self.restart, dtype=r.dtype, device=r.device)
        y = None
        for j in range(min(self.restart, self.max_iter - products)):
            w = apply(basis[j])
            for i, v in enumerate(basis):  # modified Gram-Schmidt
                h[:, i, j] = (w * v).sum(dim=1)
                w = w - h[:, i, j, None] * v
            h[:, j + 1, j] = torch.linalg.vector_norm(w, dim=1)
            basis.append(w / h[:, j + 1, j].clamp_min(tiny)[:, None])
            products += 1
            active = ~done
            finite &= torch.isfinite(h[:, : j + 2, j]).all(dim=1)
            solvable = (active & finite)[:, None]
            y = torch.linalg.lstsq(
                torch.where(solvable[:, :, None], h[:, : j + 2, : j + 1], eye[: j + 2, : j + 1]),
                torch.where(solvable, rhs[:, : j + 2], 0.0)[:, :, None],
            ).solution
            residual_norm = torch.linalg.vector_norm(
                rhs[:, : j + 2] - (h[:, : j + 2, : j + 1] @ y).squeeze(-1), dim=1
            )
            res = residual_norm if self.stop_mode == "abs" else residual_norm / b_norm.clamp_min(tiny)
            res = res.masked_fill(~finite, float("nan"))
            nstep += active.long()
            trace.append(torch.where(active, res, trace[-1]))
            newly = active & (res <= self.tol)
            if bool(newly.any()):  # freeze the samples that are solved now
                step = torch.stack(basis[: j + 1], dim=2) @ y
                x = torch.where(newly[:, None], x + step.squeeze(-1), x)
            done |= newly | ~finite
            if bool(done.all()):
                return x, products
        if y is not None:
            step = (torch.stack(basis[: y.shape[1]], dim=2) @ y).squeeze(-1)
            x = torch.where(done[:, None], x, x + step)
        return x, products
