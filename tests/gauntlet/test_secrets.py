"""Gauntlet, secrets: no key, password or pepper appears in any log line, exception or repr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from fleet.config.rules import Rule
from fleet.config.settings import Settings
from fleet.store import credentials, database
from fleet.store.pepper import PEPPER_FILE
from fleet.up import DEMO_KEYS_FILE
from tests import stores
from tests.alerts.receiver import Receiver
from tests.helpers import connect_client, free_port, wait_for

SMTP_PASSWORD = "smtp-pa55word-never-logged"


def _get(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as res:
            return res.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


@pytest.mark.slow
def test_no_secret_in_the_logs_of_a_full_run(tmp_path):
    data = tmp_path / "data"
    http_port, mqtt_port = free_port(), free_port()
    smtp_url = f"smtp://alerts:{SMTP_PASSWORD}@127.0.0.1:{free_port()}"  # nothing listens: deliveries fail
    env = {**os.environ, "FLEET_LOG_LEVEL": "DEBUG", "FLEET_INTERVAL": "0.5", "FLEET_ALERT_GROUP_WAIT": "0.5",
           "FLEET_SMTP_URL": smtp_url}
    hook = Receiver()
    proc = subprocess.Popen([sys.executable, "-m", "fleet.cli", "up", "--demo", "3", "--data-dir", str(data),
                             "--http-port", str(http_port), "--mqtt-port", str(mqtt_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: _get(f"{base}/healthz", None) == 200, timeout=30, message="fleet up healthy")
        demo = json.loads((data / DEMO_KEYS_FILE).read_text())
        acme = stores.add_org(data, "acme")
        rotated = stores.rotate_key(data, "acme", "reader")
        service_key = (data / credentials.SERVICE_KEY_FILE).read_text().strip()
        pepper = (data / PEPPER_FILE).read_text().strip()
        assert _get(f"{base}/api/fleet", demo["reader_key"]) == 200
        assert _get(f"{base}/api/fleet", acme.reader_key) == 401  # rotated away
        assert _get(f"{base}/api/fleet", "guess-" + rotated[:10]) == 401
        broker = type("B", (), {"url": f"mqtts://127.0.0.1:{mqtt_port}", "ca_path": data / "certs" / "ca.pem"})
        assert connect_client(broker, "acme/agent", acme.reader_key, "fleet-acme-x", expect_rc=1) == 5
        assert connect_client(broker, "demo/reader", demo["agent_key"], "r", expect_rc=1) == 5
        wait_for(lambda: _get(f"{base}/api/fleet", rotated) == 200, timeout=10, message="rotated key works")
        # Alerts: a signed webhook and an email channel get notified (the email fails), secrets stay out of logs.
        from fleet.notify.channels import add_channel, send_test

        settings = Settings(data_dir=data, smtp_url=smtp_url)
        webhook_secret = add_channel(settings, "demo", "hook", hook.url + "/t0ken-in-path").secret
        add_channel(settings, "demo", "mail", "mailto:ops@example.com")
        stores.add_rule(data, Rule.parse("demo", "always", "cpu_percent >= 0", "0s"))
        hook.wait_posts(1, timeout=20)
        wait_for(lambda: any(c.name == "mail" and c.last_error for c in stores.list_channels(data, "demo")),
                 timeout=20, message="the email channel's failure recorded")
        with pytest.raises(Exception, match="127.0.0.1") as failed:
            send_test(settings, "demo", "mail")
        assert SMTP_PASSWORD not in str(failed.value) + repr(failed.value)
        assert all(SMTP_PASSWORD not in (c.last_error or "") for c in stores.list_channels(data, "demo"))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        hook.close()
    secrets_ = {"demo agent": demo["agent_key"], "demo reader": demo["reader_key"], "acme agent": acme.agent_key,
                "acme reader": acme.reader_key, "rotated": rotated, "service": service_key, "pepper": pepper,
                "webhook secret": webhook_secret, "smtp password": SMTP_PASSWORD, "webhook path token": "t0ken-in-path"}
    assert err.count("\n") > 20, "expected a real debug log to search"
    for name, secret in secrets_.items():
        assert secret not in err, f"the {name} key appears in the logs"
    # stdout is the start-up banner: `fleet up --demo` prints the demo reader key there, and no other secret.
    for name, secret in secrets_.items():
        if name != "demo reader":
            assert secret not in out, f"the {name} key appears on stdout"


def test_reprs_hide_keys(tmp_path):
    org = stores.add_org(tmp_path, "acme")
    from fleet.up import ensure_demo_org

    demo = ensure_demo_org(Settings(data_dir=tmp_path))
    records = credentials.load_records(database.open_database(tmp_path / "fleet.db"))
    from fleet.notify.channels import add_channel
    from fleet.store.secretbox import secret_box

    settings = Settings(data_dir=tmp_path, smtp_url=f"smtp://u:{SMTP_PASSWORD}@mail.example.com:587", key="agent-k3y")
    added = add_channel(settings, "acme", "hook", "https://hooks.example.com/services/T0KEN")
    channel = stores.get_channel(tmp_path, "acme", "hook")
    text = repr(org) + repr(demo) + repr(list(records.values())) + repr(settings) + repr(added) + repr(channel)
    text += repr(secret_box(tmp_path)) + repr(stores.list_channels(tmp_path, "acme"))
    for secret in (org.agent_key, org.reader_key, demo.agent_key, demo.reader_key, SMTP_PASSWORD, "agent-k3y",
                   added.secret, "T0KEN"):
        assert secret not in text
    assert all(r.digest not in text for r in records.values())
