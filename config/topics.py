"""MQTT topic names of the wire contract: build, parse, and the filters each role uses."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.config.errors import ContractError
from fleet.config.ids import validate_id

ROOT = "fleet"
KINDS = ("report", "ping")
REPORT_TEMPLATE = ROOT + "/{org}/{machine}/report"
PING_TEMPLATE = ROOT + "/{org}/{machine}/ping"
ALERT_KIND = "alert"  # published (retained) by the collector only; not a kind the collector subscribes to
ALERT_TEMPLATE = ROOT + "/{org}/{machine}/alert"


@dataclass(frozen=True, slots=True)
class Topic:
    """A concrete fleet topic ``fleet/<org>/<machine>/<kind>``; validates itself on creation."""

    org: str
    machine: str
    kind: str

    def __post_init__(self) -> None:
        validate_id(self.org, "org")
        validate_id(self.machine, "machine id")
        if self.kind not in KINDS:
            raise ContractError(f"invalid topic kind {self.kind!r}: must be one of {', '.join(KINDS)}")

    def __str__(self) -> str:
        return f"{ROOT}/{self.org}/{self.machine}/{self.kind}"

    @classmethod
    def parse(cls, topic: str) -> Topic:
        """Parse ``fleet/<org>/<machine>/<kind>``; raise ContractError on anything else."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != ROOT:
            raise ContractError(f"not a fleet topic: {topic[:200]!r}")
        return cls(parts[1], parts[2], parts[3])


def report_topic(org: str, machine: str) -> str:
    """Topic an agent publishes its reports to."""
    return str(Topic(org, machine, "report"))


def ping_topic(org: str, machine: str) -> str:
    """Topic of an agent's retained presence ping."""
    return str(Topic(org, machine, "ping"))


def alert_topic(org: str, machine: str) -> str:
    """Topic of a machine's firing alerts: a retained JSON list the collector publishes."""
    return ALERT_TEMPLATE.format(org=validate_id(org, "org"), machine=validate_id(machine, "machine id"))


def org_filter(org: str) -> str:
    """Filter covering everything of one org (what a reader may subscribe to)."""
    return f"{ROOT}/{validate_id(org, 'org')}/#"


def org_kind_filter(org: str, kind: str) -> str:
    """Filter for one kind of message of every machine of an org (what a collector shard subscribes to)."""
    return _kind_filter(validate_id(org, "org"), kind)


def every_org_filter(kind: str) -> str:
    """Filter for one kind of message of every machine of every org (what an unsharded collector subscribes to)."""
    return _kind_filter("+", kind)


def _kind_filter(org_level: str, kind: str) -> str:
    if kind not in KINDS:
        raise ContractError(f"invalid topic kind {kind!r}")
    return f"{ROOT}/{org_level}/+/{kind}"


def machine_filter(org: str, machine: str) -> str:
    """Filter covering one machine's topics (the most an agent may subscribe to)."""
    return f"{ROOT}/{validate_id(org, 'org')}/{validate_id(machine, 'machine id')}/#"


def agent_client_id(org: str, machine: str) -> str:
    """MQTT client id of an agent: ``fleet-<org>-<machine>``."""
    return f"fleet-{validate_id(org, 'org')}-{validate_id(machine, 'machine id')}"


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest); ``$`` topics never match wildcards at the root."""
    f_parts = filter_.split("/")
    t_parts = topic.split("/")
    if topic.startswith("$") and f_parts[0] in ("+", "#"):
        return False
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def machine_from_client_id(org: str, client_id: str) -> str | None:
    """The machine named by an agent's client id for ``org``, or None if it is not ``fleet-<org>-<machine>``."""
    prefix = f"fleet-{org}-"
    if not client_id.startswith(prefix):
        return None
    machine = client_id[len(prefix):]
    try:
        return validate_id(machine, "machine id")
    except ContractError:
        return None
