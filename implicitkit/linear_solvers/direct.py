"""Direct solve: ``A`` materialised by ``D`` products, then an LU factorisation per sample."""

from __future__ import annotations

import torch
from torch import Tensor

from .._settings import as_count
from ..stats import SolverStats
from .base import LinearSolver, Operator


class DirectSolve(LinearSolver):
    """Solve ``A x = b`` exactly: build each sample's ``D x D`` matrix ``A`` column by column, then LU.

    Column ``i`` is ``A e_i``, one product for all samples at once (for IFT's adjoint: ``D`` VJPs). Costs
    ``D`` products and ``B D^2`` numbers of memory, so it is for small states; above ``max_size`` it refuses
    with the memory it would need. A sample whose matrix is exactly singular (a zero pivot) gets the
    least-norm solution (the pseudo-inverse's), which its residual then judges: exact when ``b`` lies in the
    range of ``A``, a failed sample otherwise, handled by the caller's failure policy like any other. Its
    stats report one step (the solve) and the residual of the result.

    Arguments:
        max_size: the largest per-sample state size ``D`` accepted.
        **kwargs: ``tol`` (for the reported result code), ``stop_mode`` of :class:`LinearSolver`.
    """

    def __init__(self, *, max_size: int = 2048, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_size = as_count("max_size", max_size)

    def solve(
        self, apply: Operator, b: Tensor, *, apply_transposed: Operator | None = None
    ) -> tuple[Tensor, SolverStats]:
        batch, dim = b.shape
        if dim > self.max_size:
            need = batch * dim * dim * b.element_size() / 2**20
            raise ValueError(
                f"DirectSolve would build a {dim} x {dim} matrix per sample ({need:.0f} MiB for the batch) and "
                f"take {dim} products, above max_size={self.max_size}. Use GMRES() for a state this large, or "
                "raise max_size if that memory is available."
            )
        eye = torch.eye(dim, dtype=b.dtype, device=b.device)
        columns = [apply(eye[i].expand(batch, dim)) for i in range(dim)]
        matrix = torch.stack(columns, dim=2)  # [B, D, D], column i = A e_i
        x, info = torch.linalg.solve_ex(matrix, b)
        singular = info != 0  # a zero pivot in the LU factorisation
        if bool(singular.any()):  # per sample: the least-norm solution, judged by its residual like any
            # Solved again with the singular samples' matrices out of the LU, whose backward would be NaN.
            x = torch.linalg.solve(torch.where(singular[:, None, None], eye, matrix), b)
            least_norm = (torch.linalg.pinv(matrix[singular]) @ b[singular][..., None]).squeeze(-1)
            x = x.index_put((singular.nonzero().squeeze(1),), least_norm)
        b_norm = torch.linalg.vector_norm(b, dim=1)
        residual = self.residual(b - (matrix @ x[..., None]).squeeze(-1), b_norm)
        return x, self.stats([residual], torch.ones(batch, dtype=torch.long, device=b.device))
