"""DEQ Sparse R-CNN: a first Sparse R-CNN stage, then one weight-tied stage solved as a fixed point."""

from __future__ import annotations

from .deqdet import DEQDet
from .rap import SparseRCNNRAP

__all__ = ["DEQSparseRCNN"]


class DEQSparseRCNN(DEQDet):
    """DEQDet's decoder with Sparse R-CNN's layers: ``y_0 = G(p)``, then ``y = F(y)`` iterated from ``y_0``.

    ``p`` are the learned proposals, ``G`` a :class:`~.sparse_rcnn_stage.SparseRCNNStage` (Sparse R-CNN's
    stage 0, which trains the proposal boxes) and ``F`` one more stage whose weights every later step
    shares. Solving, inference and training are :class:`~.deqdet.DEQDet`'s, unchanged:

    | branch | state | gradient reaches |
    |---|---|---|
    | ``init`` | ``y_0 = G(p)`` | G, proposal boxes and features |
    | ``init_f1``, ``init_f2`` | ``F(y_0)``, ``F(F(y_0))`` | F and, through ``y_0``'s features, G |
    | ``rag_s{i}`` | ``F(F(sg(y_i)))`` for ``i`` in ``supervise_steps`` (1, 3, 6, 9, 12, 20) | F |

    with ``y_i`` the state after step ``i`` of ``train_steps`` no-grad steps of ``F`` from ``sg(y_0)``,
    perturbed before every step by :class:`~.rap.SparseRCNNRAP` (box noise on the corners, re-sorted, then
    content noise). Inference applies ``F`` exactly ``test_steps`` times: there is no early exit (``test_tol``
    stays None; DEQDet's :meth:`~.deqdet.DEQDet.refine_to_tolerance` scales DEQDet's ``xyzr`` boxes, not
    these ``xyxy`` corners). Backbone and neck receive the gradients of every branch. ``F`` detaches its box
    input, so the boxes are trained per step, as between Sparse R-CNN's stages.

    Arguments:
        backbone, criterion, num_select: see :class:`~.detector.QueryDetector`.
        neck: an :class:`~.fpn.FPN`.
        proposals: the :class:`~.proposals.LearnedProposals` (held as ``queries``).
        init_layer: ``G`` (``detach_boxes=False``).
        refine_layer: ``F`` (``detach_boxes=True``).
        train_steps, test_steps, supervise_steps, init_refinements, rag_steps: as for
            :class:`~.deqdet.DEQDet`.
        perturbation: ``"rap"`` for a default :class:`~.rap.SparseRCNNRAP`, any ``(state, step) -> state``
            callable, or None.

    References: Wang et al., "Deep equilibrium object detection", ICCV 2023; Sun et al., "Sparse R-CNN",
    CVPR 2021.
    """

    default_perturbation = SparseRCNNRAP

    @property
    def test_tol(self) -> None:
        """Always None: ``F`` is applied exactly ``test_steps`` times (no early exit)."""
        return None

    @test_tol.setter
    def test_tol(self, value: float | None) -> None:
        # Every path that sets it (the constructor, configure_test, the attribute) ends here, before inference
        # would fail in DEQDet's refine_to_tolerance on a state without "xyzr".
        if value is not None:
            raise ValueError(
                f"test_tol={value!r}: DEQ Sparse R-CNN has no early exit (it is DEQDet's only: its tolerance "
                "is measured on DEQDet's xyzr boxes); keep test_tol=None and set test_steps, or use DEQDet"
            )

    @property
    def test_solver(self) -> str:
        """Always ``"fixed"``: with no early exit there is no solver to choose."""
        return "fixed"

    @test_solver.setter
    def test_solver(self, value: str) -> None:
        if value != "fixed":
            raise ValueError(
                f"test_solver={value!r}: DEQ Sparse R-CNN has no early exit, so no solver to choose (F is applied "
                "exactly test_steps times); keep test_solver='fixed', or use DEQDet for an early exit"
            )
