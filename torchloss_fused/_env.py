"""Sizes and switches read from environment variables at import, checked."""

from __future__ import annotations

import os

# The largest byte count the extension takes (a C int64_t).
MAX_BYTES = (1 << 63) - 1


def whole_number(text: str, what: str, unit: str, at_most: int | None = None) -> int:
    """int(text) if it is a whole number >= 0 (and <= at_most), else a ValueError saying
    `what` must be one (of `unit`s)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a whole number of {unit}, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    if at_most is not None and value > at_most:
        # (the extension parses a C int64_t: beyond, import failed with a bare OverflowError)
        raise ValueError(f"{what} must be at most {at_most} {unit}, got {value}")
    return value


def mib_from_env(name: str) -> int | None:
    """Bytes from the whole number of MiB in the variable `name`; None when it is unset or
    empty (`NAME=` in a shell, as for the switches)."""
    text = os.environ.get(name, "").strip()
    return None if not text else whole_number(text, name, "MiB", MAX_BYTES >> 20) << 20


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def switch(name: str) -> bool:
    """Whether the variable `name` is on: 1, true, yes, on (any case); off when unset, empty,
    0, false, no or off; any other value is a ValueError, where it had been read as off."""
    text = os.environ.get(name, "").strip().lower()
    if text in _ON or text in _OFF:
        return text in _ON
    raise ValueError(f"{name} must be one of 1, true, yes, on, 0, false, no, off, got "
                     f"{os.environ[name]!r}")
