"""Gauntlet, `fleet up` SIGKILLed mid-ingest: every report an agent got a PUBACK for is stored, once.

Accounting comes from the simulated agents' record (agent/record.py): what each published and which
PUBACKs came back, by (machine, session, seq). A witness (a persistent reader session recording every
report) tells, when something is missing, whether the broker ever routed it.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.agent.record import read_record
from fleet.agent.simulate import start_simulation
from fleet.config import payloads
from fleet.config.settings import Settings
from tests import stores
from tests.helpers import Inbox, close, connect_client, free_port, port_open, wait_for

pytestmark = pytest.mark.slow
AGENTS = 5


def _up(data: Path, mqtt_port: int, http_port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "up", "--data-dir", str(data), "--mqtt-port",
                             str(mqtt_port), "--http-port", str(http_port)],
                            env={**os.environ, "FLEET_BATCH_INTERVAL_S": "0.05"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: proc.poll() is not None or (port_open(mqtt_port) and port_open(http_port)), timeout=30,
             message="fleet up listening")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    return proc


def _rows(data: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{data / 'fleet.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_fleet_up_killed_mid_ingest_stores_every_acknowledged_report_once(tmp_path):
    data = tmp_path / "data"
    org = stores.add_org(data, "acme")
    mqtt_port, http_port = free_port(), free_port()
    url = f"mqtts://127.0.0.1:{mqtt_port}"
    procs: list[subprocess.Popen] = []
    inboxes: list[Inbox] = []
    witness = sim = None
    try:
        procs.append(_up(data, mqtt_port, http_port))
        broker = type("B", (), {"url": url, "ca_path": data / "certs" / "ca.pem"})
        witness = connect_client(broker, "acme/reader", org.reader_key, "witness", clean_session=False,
                                 before_connect=lambda c: inboxes.append(Inbox(c)))
        inboxes[0].subscribe("fleet/acme/+/report", qos=1)
        settings = Settings(data_dir=data, broker_url=url, org="acme", key=org.agent_key, interval=0.1,
                            reconnect_max_s=1.0)
        sim = start_simulation(settings, agents=AGENTS, seed=16, prefix="agent", connect_rate=50,
                               record_path=tmp_path / "record.csv")
        wait_for(lambda: _rows(data, "SELECT count(*) FROM reports")[0][0] >= 100, timeout=20,
                 message="reports stored")
        # Another writer holds the database: the collector receives but cannot commit, so it acknowledges
        # nothing, and the broker holds the agents' acknowledged reports for the collector's session...
        blocker = sqlite3.connect(data / "fleet.db", timeout=10)
        blocker.execute("BEGIN IMMEDIATE")
        acked = sim.stats()["acked"]
        wait_for(lambda: sim.stats()["acked"] >= acked + 50, timeout=10, message="reports acked while held")
        procs[0].send_signal(signal.SIGKILL)  # ...when everything dies at once
        procs[0].wait(10)
        blocker.rollback()
        blocker.close()
        before = dict(_rows(data, "SELECT machine_id, session FROM machines"))

        procs.append(_up(data, mqtt_port, http_port))

        def back() -> bool:  # every agent reporting in a new session
            rows = _rows(data, "SELECT DISTINCT machine_id, session FROM reports")
            return len({m for m, s in rows if s != before.get(m)}) == AGENTS

        wait_for(back, timeout=20, message="agents reporting in new sessions")
        sim.stop()
        wait_for(lambda: _rows(data, "SELECT count(*) FROM machines WHERE status != 'offline'") == [(0,)],
                 timeout=20, message="clean shutdowns recorded (each follows its session's reports)")
    finally:
        if sim is not None:
            sim.stop()
        if witness is not None:
            close(witness)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    # The reports table's key (org, machine, session, seq) holds each report once: "stored exactly once"
    # is "every acknowledged report is there", and nothing is there that no agent published.
    record = read_record([tmp_path / "record.csv"])
    stored = set(_rows(data, "SELECT machine_id, session, seq FROM reports"))
    witnessed = {(m.topic.split("/")[2], r.session, r.seq) for m in list(inboxes[0].messages)
                 for r in [payloads.parse_report(m.payload, m.topic)]}
    assert stored <= record.published, "stored a report no agent published"
    lost = record.acked - stored
    assert not lost, (f"{len(lost)} of {len(record.acked)} acknowledged reports were not stored "
                      f"({len(lost - witnessed)} of them never reached the witness either), e.g. {sorted(lost)[:3]}")
