"""Who may connect, publish, subscribe and receive: the access rules (docs/protocol.md) over a credentials snapshot.

Everything here is synchronous and in memory (an HMAC and a few string comparisons), so it can run
on the broker's event loop for every CONNECT and every message without stalling other clients.
The snapshot is reloaded from ``fleet.db`` off the loop (see broker/server.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fleet.config.connack import ACCEPTED, IDENTIFIER_REJECTED, NOT_AUTHORIZED
from fleet.config.enrolment import CERT_KIND, ENROL_KIND, ENROL_ROLE, RENEW_KIND, parse_enrol_username, parse_subject
from fleet.config.ids import is_valid_id
from fleet.config.payloads import MAX_PAYLOAD_BYTES
from fleet.config.topics import ALERT_KIND, ROOT, machine_from_client_id
from fleet.store import credentials, identity
from fleet.store.credentials import CredentialRecord, Principal
from fleet.store.identity import IdentitySnapshot

AGENT_KINDS = ("report", "ping")  # what an agent publishes for its machine; never the collector's alert
EXCHANGE_PRIVATE = (ENROL_KIND, RENEW_KIND, CERT_KIND)  # a machine's certificate exchange: not for readers


@dataclass(frozen=True)
class Grant:
    """What an authenticated connection is: its principal and, for an agent, the machine it speaks for."""

    principal: Principal
    machine: str | None = None
    serial: str | None = None  # set when the machine's certificate is the credential

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
    unknown: bool = False  # refused for a token or certificate the snapshot does not hold: a fresher one may


@dataclass
class AccessPolicy:
    """The access rules applied to an in-memory credentials snapshot."""

    pepper: bytes = field(repr=False)
    records: dict[str, CredentialRecord] = field(default_factory=dict, repr=False)
    identity: IdentitySnapshot = field(default_factory=IdentitySnapshot, repr=False)
    # Reloads the snapshot now (at most once a second): a machine enrolled a moment ago connects at once.
    refresh: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    def replace_records(self, records: dict[str, CredentialRecord],
                        snapshot: IdentitySnapshot | None = None) -> bool:
        """Install a fresh snapshot; True when it differs from the current one."""
        snapshot = self.identity if snapshot is None else snapshot
        changed = records != self.records or snapshot != self.identity
        self.records, self.identity = records, snapshot
        return changed

    def check_connect(self, username: str | None, password: str | bytes | None, client_id: str,
                      will_topic: str | None = None, will_payload: bytes | None = None,
                      will_retain: bool = False, peer: tuple[str, str] | None = None) -> Verdict:
        """Authenticate a CONNECT and check its client id and last will against the rules.

        ``peer`` is the (subject CN, serial) of a client certificate the TLS handshake verified: it is then the
        identity, whatever the username says."""
        if peer is not None:
            verdict = self._check_certificate(peer, client_id)
        elif not username:
            return Verdict(None, NOT_AUTHORIZED, "anonymous")
        elif (enrol := parse_enrol_username(username)) is not None:
            verdict = self._check_token(enrol, password, client_id)
        else:
            verdict = self._check_key(username, password, client_id)
        grant = verdict.grant
        if grant is None:
            return verdict
        if will_topic is not None and not self.may_publish(grant, will_topic, will_payload or b"", will_retain):
            return Verdict(None, NOT_AUTHORIZED, "last will topic not allowed")
        return verdict

    def _check_certificate(self, peer: tuple[str, str], client_id: str) -> Verdict:
        subject = parse_subject(peer[0])
        if subject is None:
            return Verdict(None, NOT_AUTHORIZED, f"certificate subject {peer[0][:80]!r} is not <org>/<machine>")
        org, machine = subject
        if peer[1] not in self.identity.serials.get(subject, frozenset()):
            return Verdict(None, NOT_AUTHORIZED, f"certificate of {org}/{machine} revoked or unknown", unknown=True)
        if machine_from_client_id(org, client_id or "") != machine:
            return Verdict(None, IDENTIFIER_REJECTED, f"client id must be fleet-{org}-{machine} for this certificate")
        return Verdict(Grant(Principal(f"{org}/{machine}", org, "agent"), machine, peer[1]), ACCEPTED)

    def _check_token(self, enrol: tuple[str, str], password: str | bytes | None, client_id: str) -> Verdict:
        org, token_id = enrol
        if not identity.check_token(self.identity, self.pepper, org, token_id, password):
            return Verdict(None, NOT_AUTHORIZED, "unknown enrolment token", unknown=True)
        machine = machine_from_client_id(org, client_id or "")
        if machine is None:
            return Verdict(None, IDENTIFIER_REJECTED, f"enrolling client id must be fleet-{org}-<machine>")
        return Verdict(Grant(Principal(f"{org}/{ENROL_ROLE}/{token_id}", org, ENROL_ROLE), machine), ACCEPTED)

    def _check_key(self, username: str, password: str | bytes | None, client_id: str) -> Verdict:
        principal = credentials.check_key(self.records, self.pepper, username, password)
        if principal is None:
            return Verdict(None, NOT_AUTHORIZED, "bad username or key")
        machine = None
        if principal.role == "agent":
            if principal.org in self.identity.key_off:
                return Verdict(None, NOT_AUTHORIZED, f"the agent key of {principal.org} is off")
            machine = machine_from_client_id(principal.org or "", client_id or "")
            if machine is None:
                return Verdict(None, IDENTIFIER_REJECTED, f"agent client id must be fleet-{principal.org}-<machine>")
            if self.identity.enrolled(principal.org, machine):
                return Verdict(None, NOT_AUTHORIZED, f"{principal.org}/{machine} is enrolled: only its certificate"
                                                     " speaks for it")
        return Verdict(Grant(principal, machine), ACCEPTED)

    def still_valid(self, username: str | None, password: str | bytes | None, grant: Grant | None = None) -> bool:
        """True while a connected client's credential is still good: key not rotated or removed, certificate not
        revoked, org key not turned off, machine not enrolled since."""
        if grant is not None and grant.serial is not None:
            return grant.serial in self.identity.serials.get((grant.org or "", grant.machine or ""), frozenset())
        if grant is not None and grant.role == ENROL_ROLE:
            enrol = parse_enrol_username(grant.principal.username)
            return enrol is not None and identity.check_token(self.identity, self.pepper, enrol[0], enrol[1], password)
        if credentials.check_key(self.records, self.pepper, username, password) is None:
            return False
        if grant is not None and grant.role == "agent":
            return grant.org not in self.identity.key_off and not self.identity.enrolled(grant.org, grant.machine)
        return True

    @staticmethod
    def may_publish(grant: Grant, topic: str, payload: bytes, retain: bool) -> bool:
        """Agents publish their own machine's report and ping; the service (the collector) publishes retained
        alert lists and clears pings; readers publish nothing."""
        if len(payload) > MAX_PAYLOAD_BYTES:
            return False
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != ROOT:
            return False
        own = parts[1] == grant.org and parts[2] == grant.machine
        if grant.role == "agent":
            return own and (parts[3] in AGENT_KINDS or (parts[3] == RENEW_KIND and grant.serial is not None))
        if grant.role == ENROL_ROLE:
            return own and parts[3] == ENROL_KIND and not retain
        if grant.role == "service":
            if not (is_valid_id(parts[1]) and is_valid_id(parts[2])):
                return False
            if parts[3] == CERT_KIND:
                return not retain
            return retain and (parts[3] == ALERT_KIND or (parts[3] == "ping" and len(payload) == 0))
        return False

    @staticmethod
    def _in_scope(grant: Grant, parts: list[str]) -> bool:
        """Readers see fleet/<org>/…, agents fleet/<org>/<machine>/…, the service all of fleet/…."""
        if parts[0] != ROOT or len(parts) < 2:
            return False
        if grant.role == "service":
            return True
        if grant.role == "reader":  # requests and answers are the machine's and the signer's business
            return parts[1] == grant.org and not (len(parts) == 4 and parts[3] in EXCHANGE_PRIVATE)
        if grant.role == "agent":
            return len(parts) >= 3 and parts[1] == grant.org and parts[2] == grant.machine
        if grant.role == ENROL_ROLE:  # only the answer to its request
            return parts == [ROOT, grant.org, grant.machine, CERT_KIND]
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
