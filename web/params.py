"""Query-string parsing for the API: bad values become a 400 with a message naming the parameter."""

from __future__ import annotations

import math
from typing import overload

from flask import abort, request

from fleet.config.labels import LabelError, Selector, check_key


def number(name: str, default: float) -> float:
    """A finite float parameter (Unix seconds and the like)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        abort(400, description=f"parameter {name!r} must be a number, got {raw[:40]!r}")
    if not math.isfinite(value):
        abort(400, description=f"parameter {name!r} must be finite")
    return value


@overload
def integer(name: str, default: int, low: int, high: int) -> int: ...
@overload
def integer(name: str, default: None, low: int, high: int) -> int | None: ...
def integer(name: str, default: int | None, low: int, high: int) -> int | None:
    """An integer parameter within [low, high]."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        abort(400, description=f"parameter {name!r} must be an integer, got {raw[:40]!r}")
    if not low <= value <= high:
        abort(400, description=f"parameter {name!r} must be between {low} and {high}")
    return value


@overload
def choice(name: str, allowed: tuple[str, ...] | dict, default: str) -> str: ...
@overload
def choice(name: str, allowed: tuple[str, ...] | dict, default: None = None) -> str | None: ...
def choice(name: str, allowed: tuple[str, ...] | dict, default: str | None = None) -> str | None:
    """A parameter restricted to known values."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if raw not in allowed:
        abort(400, description=f"parameter {name!r} must be one of {', '.join(allowed)}")
    return raw


def text(name: str, max_len: int = 128) -> str | None:
    """A free-text parameter, bounded in length."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len:
        abort(400, description=f"parameter {name!r} is longer than {max_len} characters")
    if "\x00" in raw:  # no stored text holds one, and PostgreSQL refuses it as a query parameter
        abort(400, description=f"parameter {name!r} must not contain NUL characters")
    return raw


def selector(name: str = "label") -> Selector | None:
    """Repeated ``label=KEY=VALUE`` / ``label=KEY!=VALUE`` parameters as one selector (all must hold)."""
    raw = [value for value in request.args.getlist(name) if value != ""]
    if not raw:
        return None
    try:
        return Selector.parse_all(raw)
    except LabelError as exc:
        abort(400, description=f"parameter {name!r}: {exc}")


def label_key(name: str) -> str | None:
    """A label key parameter (``group=env``)."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return check_key(raw)
    except LabelError as exc:
        abort(400, description=f"parameter {name!r}: {exc}")
