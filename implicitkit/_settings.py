"""The one ``repr`` of configuration objects (solvers, gradient estimators, linear solvers)."""

from __future__ import annotations

from typing import Any


def public_settings(obj: object) -> dict[str, Any]:
    """``obj``'s public attributes, which for a configuration object are its constructor arguments."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def settings_repr(obj: object) -> str:
    """``Name(key=value, ...)`` over :func:`public_settings`: a repr that rebuilds the object."""
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in public_settings(obj).items())})"
