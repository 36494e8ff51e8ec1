"""Org and machine id rules shared by every part."""

from __future__ import annotations

import re

from fleet.config.errors import InvalidId

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ID_RE = re.compile(rf"^{ID_PATTERN}$")
_NOT_ALLOWED = re.compile(r"[^a-z0-9_.-]")


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a string matching the org/machine id rule."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` unchanged if it is a valid id, else raise InvalidId naming ``what``."""
    if not is_valid_id(value):
        raise InvalidId(
            f"invalid {what} {value!r}: must match ^{ID_PATTERN}$ "
            "(letters, digits, '_', '.', '-'; at most 64 characters; starts with a letter or digit)"
        )
    return value  # type: ignore[return-value]


def sanitize_machine_id(hostname: str) -> str:
    """Turn a hostname into a valid machine id: lowercase, other characters become '-'."""
    name = _NOT_ALLOWED.sub("-", hostname.strip().lower())
    name = name.lstrip("_.-") or "machine"
    return validate_id(name[:64], "machine id")
