"""Debian's Mosquitto started on `fleet mosquitto-config` output, shaped like the embedded broker fixture."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.broker.mosquitto import write_config
from fleet.config.settings import Settings
from tests.helpers import BrokerProcess, free_port, wait_for

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
RUN_AS = "root" if os.geteuid() == 0 else None  # mosquitto drops root to user "mosquitto" unless told otherwise


@dataclass
class MosquittoBroker(BrokerProcess):
    """A running Mosquitto with the attributes tests use on RunningBroker (.host .port .url .ca_path .data_dir)."""

    settings: Settings = field(default_factory=Settings)
    out_dir: Path = Path()
    run_as: str | None = RUN_AS

    def reload(self) -> None:
        """Regenerate passwd/acl from the data dir and SIGHUP Mosquitto, as docs/deployment.md says."""
        write_config(self.settings, self.out_dir, user=self.run_as)
        self.proc.send_signal(signal.SIGHUP)


def accepts_tls(port: int, ca_path: Path) -> bool:
    """Whether a TLS server trusted by ``ca_path`` accepts connections on this host's ``port``."""
    ctx = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            return True
    except (OSError, ssl.SSLError):
        return False


def start_mosquitto(data_dir: Path, out_dir: Path, port: int | None = None, attempts: int = 5,
                    run_as: str | None = RUN_AS, plain: bool = False) -> MosquittoBroker:
    """Write the config for ``data_dir`` and run Mosquitto on a free port (retrying if the port was taken)."""
    if not os.path.exists(MOSQUITTO):
        pytest.fail("Debian's mosquitto is missing (apt-get install mosquitto)")
    last_output = ""
    for _ in range(attempts if port is None else 1):
        settings = Settings(data_dir=data_dir, mqtt_port=port or free_port(), mqtt_cert_port=free_port(),
                            mqtt_plain_port=free_port() if plain else 0)
        write_config(settings, out_dir, user=run_as)
        log_path = out_dir / "mosquitto.log"  # a file, not a pipe: a full pipe would stall Mosquitto
        with open(log_path, "w") as log:
            proc = subprocess.Popen([MOSQUITTO, "-c", str(out_dir / "mosquitto.conf")], stdout=log,
                                    stderr=subprocess.STDOUT)
        ca_path = data_dir / "certs" / "ca.pem"
        try:
            wait_for(lambda p=proc, port=settings.mqtt_port, ca=ca_path: p.poll() is not None or accepts_tls(port, ca),
                     timeout=10, message="mosquitto accepting TLS")
        except AssertionError:
            proc.kill()
            proc.wait(10)
            raise
        if proc.poll() is None:
            return MosquittoBroker(settings.mqtt_port, ca_path, data_dir, proc, settings=settings, out_dir=out_dir,
                                   run_as=run_as)
        last_output = log_path.read_text()  # e.g. "Address already in use": try another port
    raise AssertionError(f"mosquitto did not start: {last_output}")


