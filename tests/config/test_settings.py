"""Settings precedence (flag > env > file > default) and one-line errors naming the setting."""

import dataclasses
from pathlib import Path

import pytest

from fleet.config.errors import SettingsError
from fleet.config.settings import Settings, load_settings


def test_defaults_match_spec():
    s = load_settings(env={})
    assert (s.host, s.mqtt_port, s.http_port, s.ttl_seconds, s.interval) == ("127.0.0.1", 8883, 8080, 86400, 10.0)
    assert s.data_dir == Path("fleet-data")
    assert s.db_path == Path("fleet-data/fleet.db")
    assert s.effective_broker_url == "mqtts://127.0.0.1:8883"


def test_precedence_flag_over_env_over_file(tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('ttl_seconds = 100\nhttp_port = 9000\nmqtt_port = 9001\n')
    env = {"FLEET_TTL_SECONDS": "200", "FLEET_HTTP_PORT": "9100"}
    s = load_settings(cfg, env=env, flags={"ttl_seconds": 300, "http_port": None})
    assert s.ttl_seconds == 300  # flag wins
    assert s.http_port == 9100  # env beats file; a None flag means "not given"
    assert s.mqtt_port == 9001  # file beats default


def test_config_file_from_environment(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fleet]\nrefresh_interval_ms = 1500\n")
    assert load_settings(env={"FLEET_CONFIG": str(cfg)}).refresh_interval_ms == 1500


@pytest.mark.parametrize(("env", "fragment"), [
    ({"FLEET_TTL_SECONDS": "abc"}, "ttl_seconds"),
    ({"FLEET_TTL_SECONDS": "0"}, "ttl_seconds"),
    ({"FLEET_MQTT_PORT": "70000"}, "mqtt_port"),
    ({"FLEET_INTERVAL": "nan"}, "interval"),
    ({"FLEET_BROKER_URL": "http://x"}, "broker_url"),
    ({"FLEET_ORG": "bad/org"}, "org"),
    ({"FLEET_LOG_LEVEL": "LOUD"}, "log_level"),
    ({"FLEET_BROKER_COALESCE_MS": "-1"}, "broker_coalesce_ms"),
    ({"FLEET_BROKER_COALESCE_MS": "nan"}, "broker_coalesce_ms"),
])
def test_bad_values_name_the_setting_in_one_line(env, fragment):
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_key_and_broken_file_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("ttl_secnds = 5\n")
    with pytest.raises(SettingsError, match="ttl_secnds"):
        load_settings(bad, env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("ttl_seconds = = 5\n")
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(broken, env={})
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})


def test_settings_are_frozen_and_replace_revalidates():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.ttl_seconds = 5  # type: ignore[misc]
    assert s.replace(ttl_seconds=5).ttl_seconds == 5
    with pytest.raises(SettingsError):
        s.replace(ttl_seconds=0)


def test_orgs_list_from_env():
    assert load_settings(env={"FLEET_ORGS": "a, b,c"}).orgs == ("a", "b", "c")


OIDC = {"FLEET_OIDC_ISSUER": "https://id.example.com/realms/ops", "FLEET_OIDC_CLIENT_ID": "fleet",
        "FLEET_OIDC_CLIENT_SECRET": "s3cret-value"}


def test_single_sign_on_settings_come_together():
    settings = load_settings(env=OIDC)
    assert settings.oidc_enabled
    assert "s3cret-value" not in repr(settings)
    assert not load_settings(env={}).oidc_enabled
    for left_out in OIDC:
        env = {name: value for name, value in OIDC.items() if name != left_out}
        with pytest.raises(SettingsError) as info:
            load_settings(env=env)
        message = str(info.value)
        assert left_out in message
        assert "\n" not in message
        assert "s3cret-value" not in message


@pytest.mark.parametrize(("issuer", "ok"), [
    ("https://accounts.example.com", True),
    ("http://127.0.0.1:5556/dex", True),  # loopback: a provider on this machine
    ("http://localhost:8080/realms/ops", True),
    ("http://[::1]:9000", True),
    ("http://id.example.com", False),  # the client secret would cross the network in clear text
    ("http://10.0.0.5", False),
    ("https://id.example.com/?tenant=1", False),
    ("id.example.com", False),
    ("https://id.example.com:99999", False),
])
def test_the_issuer_is_https_but_on_loopback(issuer, ok):
    env = {**OIDC, "FLEET_OIDC_ISSUER": issuer}
    if ok:
        assert load_settings(env=env).oidc_issuer == issuer
        return
    with pytest.raises(SettingsError, match="oidc_issuer") as info:
        load_settings(env=env)
    assert "s3cret-value" not in str(info.value)
