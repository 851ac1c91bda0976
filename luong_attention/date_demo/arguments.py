"""Command-line argument checks shared by the commands (the demo's and the benchmarks').

The ``*_int``/``*_float`` functions are argparse ``type=`` converters: a bad value becomes the
subcommand's one-line usage error. :func:`check_writable` runs at the start of a command,
before any work, and raises ``argparse.ArgumentError`` (see :mod:`luong_attention.tools.cli`).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

_Number = TypeVar("_Number", int, float)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _parsed(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def natural_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _parsed(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = _parsed(text, float, "a number")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _parsed(text: str, kind: Callable[[str], _Number], name: str) -> _Number:
    """``kind(text)``, or an argparse error saying what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {name}, got {text!r}") from None


def check_writable(folder: Path, flag: str) -> None:
    """Creates ``folder`` if needed and checks that a file can be written in it.

    Args:
      folder: the folder a command will write to.
      flag: the option that named it, for the message (``--out``).

    Raises:
      argparse.ArgumentError: naming the flag, the folder and the reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise argparse.ArgumentError(
            None, f"{flag} {folder}: cannot write there ({reason})"
        ) from None
