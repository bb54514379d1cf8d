"""Command-line value types shared by the stages: finite numbers, integers within a range.

argparse names the option in its error (``argument --lr-img: nan is not a finite number``),
so a NaN, an infinity or an out-of-range value stops a stage before it reads anything.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def finite_float(text: str) -> float:
    """A float option's value: any finite number; NaN and +-infinity are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number (NaN and infinity are refused); give a number")
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An integer option's value type that refuses values outside ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer (allowed: {low}-{high})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {low}-{high}")
        return value

    parse.__name__ = f"integer {low}-{high}"
    return parse
