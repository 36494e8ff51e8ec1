"""Statuses the parts share through the database: a machine's status and the collector's heartbeat.

The collector writes them (``machines.status``, ``events.new_status``, ``heartbeats``) and the web reads
them (API filters, ``/metrics``, ``/healthz``); docs/protocol.md, "Collector state". A ping's ``status`` is ONLINE or
OFFLINE (config.payloads).
"""

from __future__ import annotations

ONLINE = "online"
STALE = "stale"
OFFLINE = "offline"
EVICTED = "evicted"  # a transition only: evicted machines leave the machines table
MACHINE_STATUSES = (ONLINE, STALE, OFFLINE)

COLLECTOR = "collector"  # heartbeats.component of the collector
BROKER = "broker"  # heartbeats.component of the embedded broker
BROKER_CONNECTED = "broker_connected"  # its heartbeat detail: False while it cannot reach the broker
DATA_DISK_PERCENT = "data_disk_percent"  # its heartbeat detail: how full the data dir's file system is (df's Use%)
DISK_FULL_PERCENT = 90.0  # over this the collector warns and /healthz says so
