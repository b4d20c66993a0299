"""Cut the graph at inputs that several losses share, so each loss can be back-propagated on its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree


class SharedInputs:
    """Leaf copies of shared inputs: losses back-propagate into them, then :meth:`backward` goes upstream once.

    Path supervision back-propagates each branch's loss as soon as it is computed, so that only one branch
    graph is alive at a time. When the branches share an input with its own graph (backbone features, an
    encoder's output), the first backward would free that graph and the second would fail. Feeding the
    branches detached leaf copies of the inputs instead lets each backward stop at the copies, where the
    gradients add up; one backward from the real inputs then carries the sum upstream::

        shared = SharedInputs(features)
        (x,) = shared.inputs
        sol = deq(z0, x, capture=(1, 3, 6, 9, 12, 20))
        sol.path.backward(criterion)  # each branch's graph is freed right after its loss
        criterion(sol.value).backward()  # the main loss, also stopping at x
        shared.backward()  # once into the backbone with the summed gradient of x

    The gradients equal those of one backward of the summed losses; see ``docs/path_supervision.md``.

    Arguments:
        *inputs: tensors, or tuples/lists/dicts of tensors; other leaves pass through unchanged.

    Attributes:
        inputs: the copies, in the same structure: a tuple with one entry per argument. A tensor that
            requires grad becomes a detached leaf that requires grad; anything else is passed as is.
    """

    def __init__(self, *inputs: Any) -> None:
        self._sources, self._treespec = pytree.tree_flatten(inputs)
        self._copies = [
            x.detach().requires_grad_() if isinstance(x, Tensor) and x.requires_grad else x
            for x in self._sources
        ]
        self.inputs: tuple = pytree.tree_unflatten(self._copies, self._treespec)

    def __iter__(self) -> Iterator:
        return iter(self.inputs)

    def take_gradients(self) -> tuple[list[Tensor], list[Tensor]]:
        """The real inputs whose copies received a gradient, and those gradients, for a caller that sends
        them upstream itself (inside one backward of its own, e.g. the one ``DistributedDataParallel``
        reduces); :meth:`backward` is this plus ``torch.autograd.backward(inputs, gradients)``.

        Returns:
            ``(inputs, gradients)``: two lists of equal length, in the order of the inputs. The copies'
            ``.grad`` is cleared, so gradients are never taken twice.
        """
        sources, grads = [], []
        for source, copy in zip(self._sources, self._copies, strict=True):
            if copy is not source and copy.grad is not None:
                sources.append(source)
                grads.append(copy.grad)
                copy.grad = None
        return sources, grads

    def backward(self, *losses: Tensor) -> None:
        """Send the gradients gathered on the copies upstream through the real inputs, in one pass.

        Call it once, after every loss computed from :attr:`inputs` has been back-propagated.

        Arguments:
            *losses: scalar losses computed from the original inputs, not the copies (for example a loss on
                an initial layer that reads the backbone directly), back-propagated in the same pass.

        Afterwards the copies' ``.grad`` is cleared, so gradients are never sent upstream twice.
        """
        tensors, grads = [], []
        for loss in losses:
            if loss.dim() != 0:
                raise ValueError(f"SharedInputs.backward takes scalar losses, got shape {tuple(loss.shape)}.")
            tensors.append(loss)
            grads.append(torch.ones_like(loss))
        sources, gathered = self.take_gradients()
        tensors += sources
        grads += gathered
        if tensors:
            torch.autograd.backward(tensors, grads)
        if any(
            copy is not source and copy.grad is not None
            for source, copy in zip(self._sources, self._copies, strict=True)
        ):
            raise RuntimeError(
                "A loss passed to SharedInputs.backward depends on the copies in SharedInputs.inputs, so its "
                "gradient reached them after they were sent upstream and was lost. Call loss.backward() on "
                "losses computed from the copies before SharedInputs.backward(), and pass only losses computed "
                "from the original inputs."
            )
