"""`fleet up --demo N`: a simulated machine runs hot and the demo org's rule fires for it, nothing to configure."""

from __future__ import annotations

import pytest

from fleet.config.settings import Settings
from fleet.up import DEMO_ORG, DEMO_RULE, start_system
from tests import stores
from tests.helpers import wait_for
from tests.test_up import get


@pytest.mark.slow
def test_the_demo_shows_an_alert_firing(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", mqtt_port=0, http_port=0, interval=1.0, reload_interval_s=0.5)
    system = start_system(settings, demo=2, real_agent=False)
    try:
        rules = {r.name: str(r.when) for r in stores.list_rules(settings.data_dir, DEMO_ORG)}
        assert rules[DEMO_RULE[0]] == DEMO_RULE[1]
        token = system.demo_keys.reader_key

        def firing():
            status, body = get(f"{system.http_url}/api/alerts?state=firing", token)
            return status == 200 and [a for a in body["data"] if (a["rule"], a["machine_id"]) ==
                                      (DEMO_RULE[0], "sim-0001")]

        # Polled twice a second: the rule's `for` is 30 s, and faster polling would use up the API's rate limit
        # (600/min) before it fires and then see only 429s.
        alert = wait_for(firing, timeout=60, message="the demo rule firing for sim-0001", interval=0.5)[0]
        assert alert["severity"] == "critical"
        assert alert["value"] > 90
    finally:
        system.stop()
