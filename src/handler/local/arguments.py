"""The command line's argument types and parser: each bad value is refused by argparse in one
line that names the argument, with exit status 2, before any database is touched."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn
from uuid import UUID

# PostgreSQL's int: priorities, attempts, limits.
INT_MIN = -(2**31)
INT_MAX = 2**31 - 1


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, saying where to read more."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def uuid_value(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a uuid: {text!r}") from None


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at position {exc.pos})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, not {type(value).__name__}")
    return value


def timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None


def whole(low: int, high: int = INT_MAX) -> Callable[[str], int]:
    """A whole number from low to high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def number(low: float, high: float, *, above_low: bool = False) -> Callable[[str], float]:
    """A finite number from low (or, with above_low, more than low) to high."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        low_ok = value > low if above_low else value >= low
        if not math.isfinite(value) or not low_ok or value > high:
            bound = f"more than {low:g}" if above_low else f"at least {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high:g}, not {text}")
        return value

    return parse
