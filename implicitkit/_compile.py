"""Functions that ``torch.compile`` runs as they are: ``torch.compiler.disable``, applied when first needed.

``torch.compiler.disable`` imports ``torch._dynamo`` (over a second) when it is applied, so applying it at
import time made ``import implicitkit`` twenty times as slow. :func:`not_compiled` marks a function the way
``disable`` does, so that a trace that meets it breaks the graph there instead of inlining it, tells the
frame evaluator (in ``torch._C``, loaded with torch) to run the wrapper's own frame as it is, and applies
``disable`` at the first call made once ``torch._dynamo`` is loaded; before that nothing can be compiling.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

F = TypeVar("F", bound=Callable[..., Any])


def not_compiled(fn: F) -> F:
    """`fn`, called outside any ``torch.compile`` graph (one graph break where compiled code calls it)."""
    disabled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def run_eagerly(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if disabled is None:
            if "torch._dynamo" not in sys.modules:  # nothing has loaded the compiler: nothing is compiling
                return fn(*args, **kwargs)
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    run_eagerly._torchdynamo_disable = True  # type: ignore[attr-defined]  # a trace does not inline it
    return run_eagerly  # type: ignore[return-value]


def _wrapper_code() -> Any:
    return not_compiled(lambda: None).__code__  # every wrapper shares it


# What ``torch._dynamo.eval_frame.skip_code`` does: the wrapper's frame runs as it is (the frames it calls
# are then up to ``disable``), also when it is first called from compiled code.
set_code_exec_strategy(_wrapper_code(), _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.DEFAULT))
