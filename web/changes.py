"""What every endpoint that changes something shares: its JSON body's fields, and library errors as JSON.

The endpoints call the library functions the ``fleet`` commands call, with the same validation: a value the
library refuses is a 400 naming the problem, something the org does not have is a 404 (another org's ids
included: never told apart), a state that forbids the change (acknowledging a resolved alert) a 409.
"""

from __future__ import annotations

from typing import Any, TypeVar

from flask import Blueprint, abort, jsonify, request

from fleet.config.errors import ConfigError
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


def field(data: dict[str, Any], name: str, kind: type[T] | tuple[type, ...], default: Any = ...) -> Any:
    """``data[name]`` of type ``kind``; without ``default`` the field is required. 400 naming the field otherwise."""
    if name not in data or data[name] is None:
        if default is ...:
            abort(400, description=f"missing field {name!r}")
        return default
    value = data[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float, (int, float)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        abort(400, description=f"field {name!r} must be {names.replace('str', 'a string')}")
    return value


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
