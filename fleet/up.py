"""``fleet up``: the embedded broker, the collector and the web app in one process, plus the demo."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.config.settings import Settings
from fleet.store import credentials
from fleet.store.database import open_database
from fleet.store.orgs import org_exists

log = logging.getLogger("fleet.up")
DEMO_ORG = "demo"
DEMO_KEYS_FILE = "demo-keys.json"
# The demo's first simulated machine runs hot in cycles (agent/simulate.py) and this rule, added with the demo
# org, fires for it within a minute: a newcomer sees an alert fire and resolve without configuring anything.
DEMO_LABELS = "env=prod,staging,dev;role=web,db,worker;site=par,fra"  # so the demo's dashboard shows groups
DEMO_RULE = ("demo-cpu-hot", "cpu_percent > 90", "30s", "critical")


@dataclass(frozen=True)
class DemoKeys:
    """Keys of the demo org, kept (0600) in the data dir so every ``fleet up --demo`` can reuse them."""

    agent_key: str = field(repr=False)
    reader_key: str = field(repr=False)


def ensure_demo_org(settings: Settings) -> DemoKeys:
    """Create org ``demo`` if absent; if it exists without saved keys, rotate both and save them."""
    data_dir = settings.data_dir
    path = data_dir / DEMO_KEYS_FILE
    with open_database(settings.database) as db:
        if org_exists(db, DEMO_ORG):
            if path.exists():
                saved = json.loads(path.read_text())
                return DemoKeys(saved["agent_key"], saved["reader_key"])
            keys = DemoKeys(credentials.rotate_key(db, data_dir, DEMO_ORG, "agent"),
                            credentials.rotate_key(db, data_dir, DEMO_ORG, "reader"))
        else:
            from fleet.config import rules
            from fleet.store import alerting

            created = credentials.add_org(db, data_dir, DEMO_ORG)
            keys = DemoKeys(created.agent_key, created.reader_key)
            name, when, for_, severity = DEMO_RULE
            alerting.add_rule(db, rules.Rule.parse(DEMO_ORG, name, when, for_, "*", severity))
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"org": DEMO_ORG, "agent_key": keys.agent_key, "reader_key": keys.reader_key}, fh)
    return keys


def start_real_agent(settings: Settings, broker_url: str, key: str) -> subprocess.Popen:
    """This machine's real agent as a child process (the key goes through the environment, not argv)."""
    env = {**os.environ, "FLEET_KEY": key}
    cmd = [sys.executable, "-m", "fleet.cli", "agent", "--broker", broker_url, "--org", DEMO_ORG,
           "--ca", str(settings.ca_path), "--data-dir", str(settings.data_dir)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a child, then SIGKILL it if it has not exited in ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@dataclass
class RunningSystem:
    """Every part started by ``fleet up``; ``stop()`` shuts them down in reverse order."""

    broker_url: str
    http_url: str
    ca_path: Path
    demo_keys: DemoKeys | None = None
    _stops: list[Callable[[], Any]] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Stop every part, newest first; an error in one part does not keep the others running."""
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                log.exception("error while stopping a part")


def start_system(settings: Settings, demo: int | None = None, real_agent: bool = True) -> RunningSystem:
    """Start broker, collector and web (and the demo agents); return once all are serving."""
    from fleet.broker.server import check_open_file_limit
    from fleet.broker.server import start_in_thread as start_broker
    from fleet.collector.service import start as start_collector
    from fleet.web.server import start_in_thread as start_web

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    check_open_file_limit(settings)  # the broker's connections, the simulator's and the web's share it
    demo_keys = ensure_demo_org(settings) if demo is not None else None
    stops: list[Callable[[], Any]] = []
    try:
        broker = start_broker(settings)
        stops.append(broker.stop)
        # Clients reach the broker on the port it really bound (the flag may have been 0).
        part_settings = settings.replace(mqtt_port=broker.port, mqtt_service_port=broker.service_port,
                                         broker_url=settings.broker_url or broker.url)
        # The collector has a listener of its own, where agents crowding the broker cannot keep it out.
        collector = start_collector(part_settings.replace(broker_url=settings.broker_url or broker.service_url))
        stops.append(collector.stop)
        web = start_web(part_settings)
        stops.append(web.stop)
        system = RunningSystem(part_settings.effective_broker_url, web.url, settings.ca_path, demo_keys, stops)
        if demo_keys is not None:
            demo_settings = part_settings.replace(org=DEMO_ORG, key=demo_keys.agent_key)
            if demo:
                from fleet.agent.simulate import start_simulation
                from fleet.config.labels import Spread

                simulation = start_simulation(demo_settings, agents=demo, hot=1, spread=Spread.parse(DEMO_LABELS))
                stops.append(simulation.stop)
            if real_agent:
                proc = start_real_agent(part_settings, system.broker_url, demo_keys.agent_key)
                stops.append(lambda: stop_process(proc))
        return system
    except BaseException:
        RunningSystem("", "", settings.ca_path, None, stops).stop()
        raise


def run_up(settings: Settings, demo: int | None = None) -> None:
    """``fleet up``: start everything, print where to look, run until Ctrl-C or SIGTERM, stop cleanly."""
    from fleet.broker.pki import cert_paths, server_identity

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    system = start_system(settings, demo)
    try:
        print(f"fleet is up (data in {settings.data_dir.resolve()})", flush=True)
        print(f"  MQTT broker:  {system.broker_url}   (CA: {system.ca_path.resolve()})", flush=True)
        for line in server_identity(cert_paths(settings.certs_dir)).lines():
            print(line, flush=True)
        print(f"  dashboard:    {system.http_url}/", flush=True)
        print(f"  health:       {system.http_url}/healthz", flush=True)
        if system.demo_keys is not None:
            print(f"  demo org:     {DEMO_ORG}, this machine's agent + {demo} simulated agents", flush=True)
            print(f"  reader key:   {system.demo_keys.reader_key}", flush=True)
            print(f"  open:         {system.http_url}/#token={system.demo_keys.reader_key}", flush=True)
            if demo:
                print(f"  alerts:       sim-0001 runs hot; rule {DEMO_RULE[0]} ({DEMO_RULE[1]} for {DEMO_RULE[2]}) "
                      "fires for it within a minute", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        stop.wait()
        print("stopping…", flush=True)
    finally:
        system.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
