"""argparse `type=` checks shared by the benchmark command lines, so a bad value is an
argparse error (usage, message, exit 2) before anything runs, never a traceback or a hang
mid-run."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64 bits; input set k uses seed + k


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: "
                                         f"{text!r}") from None


def positive_float(text: str) -> float:
    # (inf/nan included: blocked_autorange with min_run_time=inf never stops)
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, not {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:  # (nan fails too)
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), not {text}")
    return value


def output_dir(text: str) -> Path:
    """A directory that exists or can be made: checked before a run, not after it (the
    caller makes it before measuring)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot make {text}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write under {parent}")
    return path
