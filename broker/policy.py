"""Who may connect, publish, subscribe and receive: the access rules (docs/protocol.md) over a credentials snapshot.

Everything here is synchronous and in memory (an HMAC and a few string comparisons), so it can run
on the broker's event loop for every CONNECT and every message without stalling other clients.
The snapshot is reloaded from ``fleet.db`` off the loop (see broker/server.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fleet.config.connack import ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED
from fleet.config.ids import is_valid_id
from fleet.config.payloads import MAX_PAYLOAD_BYTES
from fleet.config.topics import ALERT_KIND, ROOT, machine_from_client_id
from fleet.store import credentials
from fleet.store.credentials import CredentialRecord, Principal

AGENT_KINDS = ("report", "ping")  # what an agent publishes for its machine; never the collector's alert


@dataclass(frozen=True)
class Grant:
    """What an authenticated connection is: its principal and, for an agent, the machine it speaks for."""

    principal: Principal
    machine: str | None = None

    @property
    def role(self) -> str:
        """agent, reader or service."""
        return self.principal.role

    @property
    def org(self) -> str | None:
        """The org, or None for the service user."""
        return self.principal.org


@dataclass(frozen=True)
class Verdict:
    """Outcome of a CONNECT check: a grant, or a CONNACK code and a reason for the log."""

    grant: Grant | None
    code: int
    reason: str = ""


@dataclass
class AccessPolicy:
    """The access rules applied to an in-memory credentials snapshot."""

    pepper: bytes = field(repr=False)
    records: dict[str, CredentialRecord] = field(default_factory=dict, repr=False)

    def replace_records(self, records: dict[str, CredentialRecord]) -> bool:
        """Install a fresh snapshot; True when it differs from the current one."""
        changed = records != self.records
        self.records = records
        return changed

    def check_connect(self, username: str | None, password: str | bytes | None, client_id: str,
                      will_topic: str | None = None, will_payload: bytes | None = None,
                      will_retain: bool = False) -> Verdict:
        """Authenticate a CONNECT and check its client id and last will against the rules."""
        if not username:
            return Verdict(None, NOT_AUTHORIZED, "anonymous")
        principal = credentials.check_key(self.records, self.pepper, username, password)
        if principal is None:
            return Verdict(None, NOT_AUTHORIZED, "bad username or key")
        machine = None
        if principal.role == "agent":
            machine = machine_from_client_id(principal.org or "", client_id or "")
            if machine is None:
                return Verdict(None, IDENTIFIER_REJECTED, f"agent client id must be fleet-{principal.org}-<machine>")
        grant = Grant(principal, machine)
        if will_topic is not None and not self.may_publish(grant, will_topic, will_payload or b"", will_retain):
            return Verdict(None, NOT_AUTHORIZED, "last will topic not allowed")
        return Verdict(grant, ACCEPTED)

    def still_valid(self, username: str | None, password: str | bytes | None) -> bool:
        """True while a connected client's credentials are still in the snapshot (rotation/removal)."""
        return credentials.check_key(self.records, self.pepper, username, password) is not None

    @staticmethod
    def may_publish(grant: Grant, topic: str, payload: bytes, retain: bool) -> bool:
        """Agents publish their own machine's report and ping; the service (the collector) publishes retained
        alert lists and clears pings; readers publish nothing."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            return False
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != ROOT:
            return False
        if grant.role == "agent":
            return parts[1] == grant.org and parts[2] == grant.machine and parts[3] in AGENT_KINDS
        if grant.role == "service":
            if not (retain and is_valid_id(parts[1]) and is_valid_id(parts[2])):
                return False
            return parts[3] == ALERT_KIND or (parts[3] == "ping" and len(payload) == 0)
        return False

    @staticmethod
    def _in_scope(grant: Grant, parts: list[str]) -> bool:
        """Readers see fleet/<org>/…, agents fleet/<org>/<machine>/…, the service all of fleet/…."""
        if parts[0] != ROOT or len(parts) < 2:
            return False
        if grant.role == "service":
            return True
        if grant.role == "reader":
            return parts[1] == grant.org
        if grant.role == "agent":
            return len(parts) >= 3 and parts[1] == grant.org and parts[2] == grant.machine
        return False

    @staticmethod
    def may_subscribe(grant: Grant, topic_filter: str) -> bool:
        """A filter must lie inside the grant's scope (wildcards only below it)."""
        return AccessPolicy._in_scope(grant, topic_filter.split("/"))

    @staticmethod
    def may_receive(grant: Grant, topic: str) -> bool:
        """Checked on every delivery, retained or live: a client only ever receives its own scope's topics."""
        parts = topic.split("/", 3)
        return len(parts) >= 3 and AccessPolicy._in_scope(grant, parts)
