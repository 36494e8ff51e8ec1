"""FleetBroker: amqtt 0.12.1's Broker with the defects that break the broker guarantees (docs/protocol.md) closed.

The overrides live in three modules, one per part of the broker, each listing the stock behaviour it
replaces: broker/protocol.py (one connection: PUBACK after routing, outgoing QoS 1, keepalive, quiet
close), broker/connect.py (authentication before sessions, takeover, keepalive watchdog, restored
sessions), broker/routing.py (access rules on every delivery, retained messages, bounded queues).
The private amqtt names they rely on are listed, and checked against the installed amqtt, in
tests/broker/test_amqtt_seam.py; the two process-wide patches are in broker/patches.py.
"""

from __future__ import annotations

from fleet.broker.connect import SessionBroker


class FleetBroker(SessionBroker):
    """amqtt Broker with the broker guarantees; ``policy`` decides, ``stats`` counts what was refused or dropped."""

    @property
    def bound_ports(self) -> dict[str, int]:
        """Actual port of each listener (for port 0)."""
        ports = {}
        for name, server in self._servers.items():
            sockets = getattr(server.instance, "sockets", None) or []
            if sockets:
                ports[name] = sockets[0].getsockname()[1]
        return ports
