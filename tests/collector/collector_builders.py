"""Message builders shared by the collector tests: real payloads through the real validator."""

from fleet.collector.state import Tracker
from fleet.config import payloads
from fleet.config.topics import ping_topic, report_topic

T0 = 1_764_000_000.0
INTERVAL = 10.0


def report(session="s1", seq=0, ts=T0, machine="web-1", hw="hw-a", org="acme", os_name="Linux", metrics=None):
    data = payloads.build_report(machine, hw, session, seq, ts, metrics or {"cpu_percent": 5.0},
                                 {"os": os_name, "hardware_id": hw})
    return payloads.parse_report(payloads.encode(data), report_topic(org, machine))


def ping(status="online", session="s1", ts=T0, reason=None, machine="web-1", hw="hw-a", org="acme",
         interval=INTERVAL, prev=None):
    data = payloads.build_ping(machine, hw, session, status, interval, ts=ts, reason=reason, prev=prev)
    return payloads.parse_ping(payloads.encode(data), ping_topic(org, machine))


def tracker(ttl=3600.0, grace=60.0):
    return Tracker(stale_factor=3.0, default_interval_s=INTERVAL, ttl_seconds=ttl, lost_grace_s=grace)
