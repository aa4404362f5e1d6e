"""Sizes read from environment variables at import, checked."""

from __future__ import annotations

import os


def whole_number(text: str, what: str, unit: str) -> int:
    """int(text) if it is a whole number >= 0, else a ValueError saying `what` must be one
    (of `unit`s)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a whole number of {unit}, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def mib_from_env(name: str) -> int | None:
    """Bytes from the whole number of MiB in the variable `name`; None when it is unset."""
    text = os.environ.get(name)
    return None if text is None else whole_number(text, name, "MiB") << 20
