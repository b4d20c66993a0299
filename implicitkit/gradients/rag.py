"""The refinement-aware gradient of DEQDet."""

from __future__ import annotations

from .phantom import Phantom


class RAG(Phantom):
    """Refinement-aware gradient: ``k`` undamped grad-attached applications of f from ``sg(z*)``.

    For ``k = 2`` the output is ``f(f(sg(z*)))`` and ``(I - J)^-1`` is replaced by ``I + J``: a loss on the
    twice-refined state trains f to improve its own output, the refinement view of the fixed point.

    Arguments:
        k: number of grad-attached refinement steps (DEQDet uses 2).

    Reference: Wang et al., "Deep equilibrium object detection", ICCV 2023.
    """

    def __init__(self, k: int = 2) -> None:
        super().__init__(k=k, tau=1.0)

    def __repr__(self) -> str:
        return f"RAG(k={self.k})"
