"""The test suite hides only amqtt's deprecation warnings: ours and others' stay visible."""

from __future__ import annotations

import re
import warnings


def action_for(category: type[Warning], module: str, message: str = "x") -> str:
    """What the warning filters in force now do with ``category`` raised from ``module``."""
    for action, msg, cat, mod, _lineno in warnings.filters:
        if (issubclass(category, cat) and (msg is None or re.match(msg, message))
                and (mod is None or re.match(mod, module))):
            return action
    return warnings.defaultaction


def test_only_amqtts_deprecation_warnings_are_ignored():
    assert action_for(DeprecationWarning, "amqtt.broker") == "ignore"
    for module in ("fleet.collector.service", "fleet.web.app", "paho.mqtt.client", "flask.app"):
        assert action_for(DeprecationWarning, module) != "ignore", module
