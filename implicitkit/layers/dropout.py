"""Variational dropout: one mask per solve, held across every application of the cell."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .per_solve import PerSolveModule


class _Mask:
    """The mask of one solve, drawn on the first call (it needs the input's shape)."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None


class VariationalDropout(PerSolveModule):
    """Dropout whose mask is drawn once per solve: ``y = x * m / (1 - p)``, ``m ~ Bernoulli(1 - p)``.

    An ordinary ``nn.Dropout`` inside a DEQ cell draws a new mask at every application, so the map changes
    from step to step and the solver never converges. Here the mask is drawn on the first call of a solve
    and reused by every later call of the same solve: the solver's steps, the gradient estimator's
    grad-attached applications, a checkpointed replay, the stacked branches of
    :meth:`~implicitkit.Path.stacked` (``r`` blocks of the batch: each row gets its sample's mask).
    :class:`~implicitkit.DEQ` starts each solve for the layers its cell holds (an ``nn.Module`` cell: a
    function or lambda hides its layers); with :func:`~implicitkit.fixed_point`, call
    :func:`~implicitkit.new_solve` on the cell first. In eval mode, or with ``p = 0``, it is the identity.

    Arguments:
        p: probability of zeroing an element, in ``[0, 1)``.
        broadcast_dims: dimensions along which one mask entry is shared, e.g. ``(2, 3)`` (or ``(-2, -1)``)
            for ``[B, C, H, W]`` features: whole channels are dropped, the same at every pixel. The batch
            dimension gets its own entries unless listed.
        generator: draws the masks, for reproducible masks independent of the global seed.

    Reference: Gal & Ghahramani, "A theoretically grounded application of dropout in recurrent neural
    networks", NeurIPS 2016; Bai et al., "Deep equilibrium models", NeurIPS 2019.
    """

    def __init__(
        self, p: float = 0.1, *, broadcast_dims: Sequence[int] = (), generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability p must lie in [0, 1), got {p}.")
        self.p = float(p)
        self.broadcast_dims = tuple(int(d) for d in broadcast_dims)
        self.generator = generator
        self.solve_state: _Mask | None = None

    def new_solve_state(self) -> _Mask:
        return _Mask()

    @property
    def mask(self) -> Tensor | None:
        """The current solve's mask (scaled by ``1 / (1 - p)``), or ``None`` before its first call."""
        return None if self.solve_state is None else self.solve_state.mask

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.solve_state is None:
            raise RuntimeError(
                "VariationalDropout holds one mask per solve, and no solve has started for it. ik.DEQ starts "
                "one for the layers its cell holds: give it an nn.Module cell that holds this layer (a "
                "function or lambda cell hides them), or call ik.new_solve(cell) before each ik.fixed_point "
                "solve."
            )
        shape = self._mask_shape(x)
        held = self.solve_state
        if held.mask is None:
            keep = torch.empty(shape, dtype=x.dtype, device=x.device)
            held.mask = keep.bernoulli_(1.0 - self.p, generator=self.generator).div_(1.0 - self.p)
        elif held.mask.shape != shape and _stacks_of(held.mask.shape, shape):
            # Path.stacked: r blocks of the solve's B samples, row j B + i is sample i again.
            return x * held.mask.repeat(shape[0] // held.mask.shape[0], *[1] * (x.dim() - 1))
        elif held.mask.shape != shape:
            raise ValueError(
                f"VariationalDropout drew its mask of shape {tuple(held.mask.shape)} for this solve and is now "
                f"called with an input of shape {tuple(x.shape)}. Use one VariationalDropout per place in the "
                "cell, each always applied to inputs of one shape."
            )
        return x * held.mask

    def _mask_shape(self, x: Tensor) -> torch.Size:
        shape = list(x.shape)
        for d in self.broadcast_dims:
            if not -x.dim() <= d < x.dim():
                raise IndexError(
                    f"broadcast_dims has dimension {d}, but the input has {x.dim()} dimensions {tuple(x.shape)}."
                )
            shape[d] = 1
        return torch.Size(shape)

    def extra_repr(self) -> str:
        return f"p={self.p}, broadcast_dims={self.broadcast_dims}"


def _stacks_of(mask: torch.Size, shape: torch.Size) -> bool:
    """``shape`` is ``r`` blocks of the batch ``mask`` was drawn for, stacked along the batch axis."""
    return len(mask) == len(shape) and mask[1:] == shape[1:] and mask[0] > 1 and shape[0] % mask[0] == 0
