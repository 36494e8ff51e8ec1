"""What every endpoint that changes something shares: its JSON body's fields, and library errors as JSON.

The endpoints call the library functions the ``fleet`` commands call, with the same validation: a value the
library refuses is a 400 naming the problem, something the org does not have is a 404 (another org's ids
included: never told apart), a state that forbids the change (acknowledging a resolved alert) a 409.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from flask import Blueprint, abort, jsonify, request

from fleet.config.errors import ConfigError
from fleet.config.rules import parse_duration
from fleet.notify.errors import NotifyError
from fleet.store.alerting import NotFiring
from fleet.store.errors import CredentialError, NotFound

T = TypeVar("T")


def body() -> dict[str, Any]:
    """The request's JSON object; 400 when it is missing or not an object."""
    found = request.get_json(silent=True)
    if not isinstance(found, dict):
        abort(400, description="the body must be a JSON object (Content-Type: application/json)")
    return found


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def field(data: dict[str, Any], name: str, kind: type[T] | tuple[type, ...], default: Any = ...,
          what: str | None = None) -> Any:
    """``data[name]`` of type ``kind`` (``what`` describes it); without ``default`` the field is required.
    400 naming the field otherwise."""
    if name not in data or data[name] is None:
        if default is ...:
            abort(400, description=f"missing field {name!r}")
        return default
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        what = what or " or ".join(_KINDS.get(k, k.__name__) for k in kinds)
        abort(400, description=f"field {name!r} must be {what}")
    return value


def duration(data: dict[str, Any], name: str, default: Any = ...) -> float:
    """A duration field in seconds: text as the CLI takes it (``30m``, ``2h``, ``1d``) or a number of seconds."""
    value = field(data, name, (str, int, float), default, "a duration such as '1h' or a number of seconds")
    if isinstance(value, str):
        return parse_duration(value)
    if not math.isfinite(value):
        abort(400, description=f"field {name!r} must be a finite number of seconds")
    return float(value)


def _error(status: int, exc: Exception):
    response = jsonify({"error": str(exc) or type(exc).__name__, "status": status})
    response.status_code = status
    return response


def json_errors(bp: Blueprint) -> Blueprint:
    """Answer the library's errors raised in ``bp``'s views as JSON: 404, 409 or 400 with the message."""
    bp.register_error_handler(NotFound, lambda exc: _error(404, exc))
    bp.register_error_handler(NotFiring, lambda exc: _error(409, exc))
    for refused in (ConfigError, CredentialError, NotifyError):
        bp.register_error_handler(refused, lambda exc: _error(400, exc))
    return bp
