"""Argument types shared by the load generator's and the bench's command lines."""

from __future__ import annotations

import argparse

__all__ = ["non_negative_float", "non_negative_int", "positive_float", "positive_int"]


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
    return value


def _finite(text: str, *, allow_zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 if allow_zero else value > 0) or value == float("inf"):
        bound = "0 or more" if allow_zero else "above 0"
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}: {text!r}")
    return value


def positive_int(text: str) -> int:
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    return _whole(text, 0)


def positive_float(text: str) -> float:
    return _finite(text, allow_zero=False)


def non_negative_float(text: str) -> float:
    return _finite(text, allow_zero=True)
