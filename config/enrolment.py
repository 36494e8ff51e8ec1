"""The machine-identity contract every part shares: enrolment tokens, exchange topics and payloads, CSR checks.

A token is ``K10<CA fingerprint>::<id>:<secret>`` (k3s' join-token layout): the agent checks the CA the
broker presents against the fingerprint before it sends anything. The exchange runs on the machine's own
topics: ``fleet/<org>/<machine>/enrol`` (a CSR with a token, the token's secret being the MQTT password),
``fleet/<org>/<machine>/renew`` (a CSR over the machine's certificate connection) and
``fleet/<org>/<machine>/cert`` (the answer). Nothing secret travels in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fleet.config.errors import ContractError
from fleet.config.ids import ID_PATTERN, validate_id
from fleet.config.topics import ROOT

TOKEN_PREFIX = "K10"
TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 32
_TOKEN_RE = re.compile(r"^K10([0-9a-f]{64})::([0-9a-f]{16}):([A-Za-z0-9_-]{20,100})$")
ENROL_KIND, RENEW_KIND, CERT_KIND = "enrol", "renew", "cert"
EXCHANGE_KINDS = (ENROL_KIND, RENEW_KIND, CERT_KIND)
ENROL_ROLE = "enrol"  # MQTT username <org>/enrol/<token id>, password the token's secret
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is under 1 KiB; anything near this is not one
CERT_DAYS_DEFAULT = 365
RENEW_AT = 2 / 3  # of a certificate's lifetime
# Why a request was refused: the reason the agent prints and the server counts.
UNKNOWN, EXPIRED, USED_UP, REVOKED = "unknown", "expired", "used up", "revoked"
BAD_CSR, ENROLLED, NOT_ENROLLED = "bad csr", "already enrolled", "not enrolled"
_CN_RE = re.compile(rf"^({ID_PATTERN})/({ID_PATTERN})$")


def agent_command(broker_url: str, org: str, token: str) -> str:
    """The command line that installs an agent with an enrolment token (``fleet enrol create``, ``/api/enrol``)."""
    return f"fleet agent --broker {broker_url} --org {org} --enrol {token}"


class EnrolmentError(ContractError):
    """A token or request that does not follow the contract; ``reason`` is one of the stable reasons above."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Token:
    """A parsed enrolment token; the secret is never shown by repr."""

    ca_fingerprint: str
    id: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{TOKEN_PREFIX}{self.ca_fingerprint}::{self.id}:{self.secret}"

    @classmethod
    def parse(cls, text: str) -> Token:
        """Parse a token; EnrolmentError(unknown) when it is not one."""
        match = _TOKEN_RE.fullmatch(text.strip())
        if match is None:
            raise EnrolmentError(UNKNOWN, "not an enrolment token (K10<fingerprint>::<id>:<secret>)")
        return cls(*match.groups())


def enrol_username(org: str, token_id: str) -> str:
    """MQTT username an enrolling agent connects with: ``<org>/enrol/<token id>``."""
    return f"{validate_id(org, 'org')}/{ENROL_ROLE}/{token_id}"


def parse_enrol_username(username: str) -> tuple[str, str] | None:
    """(org, token id) of an enrolment username, or None."""
    parts = username.split("/")
    if len(parts) != 3 or parts[1] != ENROL_ROLE or not re.fullmatch(r"[0-9a-f]{16}", parts[2]):
        return None
    return parts[0], parts[2]


def exchange_topic(org: str, machine: str, kind: str) -> str:
    """``fleet/<org>/<machine>/<kind>`` for enrol, renew or cert."""
    if kind not in EXCHANGE_KINDS:
        raise ContractError(f"invalid exchange kind {kind!r}")
    return f"{ROOT}/{validate_id(org, 'org')}/{validate_id(machine, 'machine id')}/{kind}"


def subject_name(org: str, machine: str) -> str:
    """A machine certificate's subject CN: ``<org>/<machine>``."""
    return f"{validate_id(org, 'org')}/{validate_id(machine, 'machine id')}"


def parse_subject(common_name: str) -> tuple[str, str] | None:
    """(org, machine) named by a certificate's CN, or None."""
    match = _CN_RE.fullmatch(common_name)
    return (match.group(1), match.group(2)) if match else None


def request_payload(csr_pem: str, request: str, token_id: str | None = None) -> dict[str, Any]:
    """What the agent publishes on enrol (with ``token_id``) or renew: its CSR and a request id it waits for."""
    body: dict[str, Any] = {"v": 1, "request": request, "csr": csr_pem}
    if token_id is not None:
        body["token_id"] = token_id
    return body


def answer_payload(request: str, cert_pem: str | None = None, error: str | None = None) -> dict[str, Any]:
    """The signer's answer on ``cert``: the certificate, or the reason for a refusal."""
    if cert_pem is not None:
        return {"v": 1, "request": request, "ok": True, "cert": cert_pem}
    return {"v": 1, "request": request, "ok": False, "error": error or BAD_CSR}

