"""MQTT 3.1.1 CONNACK return codes: what a broker answers a CONNECT with, and what each code means."""

from __future__ import annotations

from typing import Any

ACCEPTED = 0
UNACCEPTABLE_PROTOCOL = 1
IDENTIFIER_REJECTED = 2
SERVER_UNAVAILABLE = 3
BAD_CREDENTIALS = 4
NOT_AUTHORIZED = 5

REASONS = {
    UNACCEPTABLE_PROTOCOL: "unacceptable protocol version",
    IDENTIFIER_REJECTED: "client identifier rejected",
    SERVER_UNAVAILABLE: "server unavailable",
    BAD_CREDENTIALS: "bad user name or password",
    NOT_AUTHORIZED: "not authorized",
}

# paho 2 reports an MQTT 3.1.1 refusal with the MQTT 5 reason code of the same meaning.
_FROM_REASON_CODE = {0x84: UNACCEPTABLE_PROTOCOL, 0x85: IDENTIFIER_REJECTED, 0x88: SERVER_UNAVAILABLE,
                     0x86: BAD_CREDENTIALS, 0x87: NOT_AUTHORIZED}


def describe(code: int) -> str:
    """What a non-zero return code means, for a log line or an error message."""
    return REASONS.get(code, f"return code {code}")


def from_reason_code(reason_code: Any) -> int:
    """The 3.1.1 return code behind a paho 2 ``on_connect`` reason code (a ReasonCode or an int)."""
    code = int(getattr(reason_code, "value", reason_code))
    return _FROM_REASON_CODE.get(code, code)
