"""The Alertmanager channel against Debian's prometheus-alertmanager: what fleet posts comes out of Alertmanager at
its webhook receiver, firing and then resolved, with the labels, annotations and fingerprint fleet gave it."""

from __future__ import annotations

import calendar
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleet.notify import Notice, deliver, fingerprint, resend_interval
from tests.collector.http_recorder import Recorded, Recorder, recording
from tests.helpers import free_port, wait_for

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"

# About a second in all (Alertmanager starts fast, the route waits 100 ms): no ``slow`` mark.
pytestmark = pytest.mark.skipif(
    not Path(ALERTMANAGER).exists(),
    reason="needs Debian's prometheus-alertmanager (apt-get install prometheus-alertmanager)")

CONFIG = """\
route:
  receiver: fleet-test
  group_by: ['alertname', 'org']
  group_wait: 100ms
  group_interval: 300ms
  repeat_interval: 1h
  routes:
    - matchers: ['env="prod"']
      receiver: pager
receivers:
  - name: fleet-test
    webhook_configs:
      - url: {hook}
        send_resolved: true
  - name: pager
    webhook_configs:
      - url: {hook}/pager
        send_resolved: true
"""


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def receiver() -> Iterator[Recorder]:
    """The webhook receiver Alertmanager notifies."""
    with recording() as rec:
        yield rec


@pytest.fixture
def alertmanager(tmp_path: Path, receiver: Recorder) -> Iterator[str]:
    """Alertmanager on a free loopback port, clustering off, its data in tmp; yields its base URL."""
    config = tmp_path / "alertmanager.yml"
    config.write_text(CONFIG.format(hook=receiver.url + "/am-hook"))
    port = free_port()
    log = (tmp_path / "alertmanager.log").open("wb")
    process = subprocess.Popen(
        [ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or process.poll() is not None, 20, "alertmanager ready")
        if process.poll() is not None:
            raise AssertionError(f"alertmanager exited: {(tmp_path / 'alertmanager.log').read_text()[-2000:]}")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


def _alert_out(status: str, machine: str) -> Callable[[Recorded], bool]:
    def match(request: Recorded) -> bool:
        body = request.json()
        return any(a["status"] == status and a["labels"].get("machine_id") == machine for a in body["alerts"])
    return match


def test_alert_comes_out_of_alertmanager_firing_then_resolved(alertmanager: str, receiver: Recorder) -> None:
    channel = "alertmanager+" + alertmanager
    started = time.time() - 120
    common = {"org": "acme", "rule": "machine-offline", "machine_id": "web-1", "severity": "critical",
              "summary": "web-1 is offline (status == offline for 2m)", "value": None, "starts_at": started,
              "fingerprint": fingerprint("acme", "machine-offline", "web-1", "critical")}
    deliver("alertmanager", channel, None, [Notice(status="firing", ends_at=None, **common)], "acme", smtp_url=None)

    fired = receiver.wait_for(_alert_out("firing", "web-1"), timeout=15).json()
    assert fired["status"] == "firing"
    assert fired["receiver"] == "fleet-test"
    (alert,) = fired["alerts"]
    assert alert["labels"] == {"alertname": "machine-offline", "org": "acme", "machine_id": "web-1",
                               "severity": "critical"}
    assert alert["annotations"] == {"summary": "web-1 is offline (status == offline for 2m)"}
    assert alert["fingerprint"] == common["fingerprint"]  # fleet computes Alertmanager's own fingerprint
    assert alert["startsAt"].startswith(time.strftime("%Y-%m-%dT%H:%M", time.gmtime(started)))

    # While firing, Alertmanager holds it active well past a resend interval: it will not auto-resolve.
    with urllib.request.urlopen(alertmanager + "/api/v2/alerts", timeout=5) as response:
        (held,) = json.load(response)
    assert held["status"]["state"] == "active"
    ends = calendar.timegm(time.strptime(held["endsAt"][:19], "%Y-%m-%dT%H:%M:%S"))
    interval = resend_interval("alertmanager")
    assert interval is not None
    assert ends > time.time() + 2 * interval

    deliver("alertmanager", channel, None, [Notice(status="resolved", ends_at=time.time(), **common)], "acme",
            smtp_url=None)
    resolved = receiver.wait_for(_alert_out("resolved", "web-1"), timeout=15).json()
    assert resolved["status"] == "resolved"
    assert resolved["alerts"][0]["fingerprint"] == common["fingerprint"]


def test_a_route_on_a_machine_label_picks_the_receiver(alertmanager: str, receiver: Recorder) -> None:
    channel = "alertmanager+" + alertmanager
    notices = []
    for machine, env in (("web-1", "prod"), ("web-2", "dev")):
        labels = {"env": env, "role": "web"}
        notices.append(Notice(status="firing", org="acme", rule="cpu-hot", machine_id=machine, severity="warning",
                              summary=f"{machine} is hot", value=95.0, starts_at=time.time() - 60, ends_at=None,
                              fingerprint=fingerprint("acme", "cpu-hot", machine, "warning", labels),
                              machine_labels=labels))
    deliver("alertmanager", channel, None, notices, "acme", smtp_url=None)
    paged = receiver.wait_for(lambda r: r.path == "/am-hook/pager", timeout=15).json()
    other = receiver.wait_for(lambda r: r.path == "/am-hook", timeout=15).json()
    assert paged["receiver"] == "pager"
    (alert,) = paged["alerts"]
    assert alert["labels"] == {"alertname": "cpu-hot", "org": "acme", "machine_id": "web-1", "severity": "warning",
                               "env": "prod", "role": "web"}
    assert alert["fingerprint"] == notices[0].fingerprint
    assert [a["labels"]["machine_id"] for a in other["alerts"]] == ["web-2"]
