"""Configuration objects (solvers, gradient estimators, linear solvers): their one ``repr``, their counts."""

from __future__ import annotations

import numbers
import operator
from typing import Any


def public_settings(obj: object) -> dict[str, Any]:
    """``obj``'s public attributes, which for a configuration object are its constructor arguments."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def settings_repr(obj: object) -> str:
    """``Name(key=value, ...)`` over :func:`public_settings`: a repr that rebuilds the object."""
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in public_settings(obj).items())})"


def as_count(name: str, value: object) -> int:
    """``value`` as an ``int``, never truncated: ``max_iter=2.9`` fails instead of meaning 2.

    Integers pass (Python, numpy and torch scalars: anything with ``__index__``), and so do whole floats such as
    ``1e3``; a fractional float, a bool and a string raise. The range is the caller's to check.

    Arguments:
        name: the argument as the user wrote it, for the message.
        value: the count given.
    """
    if not isinstance(value, bool):  # True would index as 1
        try:
            return operator.index(value)
        except TypeError:
            if isinstance(value, numbers.Real) and float(value).is_integer():
                return int(value)
    raise TypeError(
        f"{name} must be a whole number, got {value!r} ({type(value).__name__}); a count is not rounded "
        "silently, so pass an int (round(...) or int(...) if that is what is meant)."
    )
