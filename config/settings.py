"""Settings of every part: package defaults < TOML file < FLEET_* environment < command-line flags.

Each setting ``name`` is read from the TOML key ``name`` and the variable ``FLEET_<NAME>``.
A bad value raises SettingsError whose message names the setting, for a one-line exit 1.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleet.config.errors import SettingsError
from fleet.config.ids import is_valid_id
from fleet.config.labels import LabelError, Labels
from fleet.config.payloads import MAX_PROCESS_CHECKS, is_check_name

ENV_PREFIX = "FLEET_"
WILDCARD_HOSTS = ("", "0.0.0.0", "::")  # bind addresses meaning every interface: no client connects to them


BROKER_LOOPS = ("asyncio", "uvloop")
DEFAULT_MQTT_PORT = 8883
DEFAULT_SERVICE_PORT = 8884


def local_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host`` (127.0.0.1 for a wildcard)."""
    return "127.0.0.1" if host in WILDCARD_HOSTS else host


@dataclass(frozen=True)
class Settings:
    """Every tunable of fleet, typed and validated on creation."""

    data_dir: Path = Path("fleet-data")
    # sqlite:///PATH or postgresql://user:password@host:port/dbname; default sqlite:///<data_dir>/fleet.db
    database_url: str = field(default="", repr=False)
    log_level: str = "INFO"
    # network
    host: str = "127.0.0.1"
    cert_names: tuple[str, ...] = ()  # more names of the server certificate: DNS names or addresses
    mqtt_port: int = DEFAULT_MQTT_PORT
    mqtt_plain_port: int = 0  # 0 = no plain listener; when set it binds loopback only
    mqtt_service_port: int = 0  # the collector's own TLS listener; 0 = 8884 with the default mqtt_port, else a free one
    mqtt_cert_port: int = 0  # Mosquitto's machine-certificate listener; 0: the embedded broker's one TLS port
    http_port: int = 8080
    broker_url: str = ""  # default: mqtts://<host>:<mqtt_port> of the embedded broker
    ca: str = ""  # CA file agents/collector/web verify the broker with; default <data_dir>/certs/ca.pem
    # credentials and orgs
    reload_interval_s: float = 2.0
    cert_days: int = 365  # lifetime of a machine certificate the signer issues
    orgs: tuple[str, ...] = ()  # collector shard; empty = every org
    # agent
    org: str = ""
    key: str = field(default="", repr=False)
    enrol: str = field(default="", repr=False)  # an enrolment token: the agent's first start makes its certificate
    machine: str = ""
    interval: float = 10.0
    agent_queue_max_reports: int = 100_000
    agent_queue_max_bytes: int = 64 * 1024 * 1024
    reconnect_max_s: float = 60.0
    textfile_dir: str = ""  # *.prom files in Prometheus text format, reported as metrics.custom
    processes: tuple[str, ...] = ()  # process checks: NAME, or re:REGEX over the command line
    labels: Labels = Labels()  # sent in every report; a TOML table, KEY=VALUE,... in FLEET_LABELS, --label KEY=VALUE
    # broker
    max_queued_messages: int = 1000  # per reader/agent session: a stuck subscriber cannot hold more
    service_queued_messages: int = 200_000  # per collector session: seconds of full ingest, never dropped lightly
    max_connections: int = 50_000
    # Admission on the agents' listener, before TLS: handshakes in flight, and new connections a second (0 = any).
    max_handshakes: int = 64
    accept_rate: float = 500.0
    max_unsent_bytes: int = 1024 * 1024  # per connection: a client that reads nothing is dropped past this
    broker_loop: str = "asyncio"  # asyncio, or uvloop (libuv) for the embedded broker's event loop
    broker_coalesce_ms: float = 5.0  # asyncio loop: events gather this long after each wake-up (0 = wake at once)
    broker_durability: str = "full"  # full: fsync each group commit; normal: SQLite WAL checkpoints; off: memory
    # collector
    ttl_seconds: int = 86_400
    stale_factor: float = 3.0
    batch_max: int = 500
    batch_interval_s: float = 0.25
    history_raw_days: float = 7.0
    history_rollup_days: float = 90.0
    agent_rate_limit_per_s: float = 50.0
    lost_grace_s: float = 60.0  # after an agent names its previous session, wait this long for replays, then count
    instance: str = ""  # this collector's name in /healthz and /metrics; default <hostname>:<pid>
    collector_lease_s: float = 10.0  # the active collector's lease: a waiting one takes over once it expires
    heartbeat_url: str = field(default="", repr=False)  # an outside dead-man's switch, requested while healthy
    heartbeat_interval: float = 60.0
    heartbeat_method: str = "GET"  # GET, or POST with a JSON summary
    # alerts
    alert_group_wait: float = 10.0  # seconds an org's notifications are gathered into one message
    smtp_url: str = field(default="", repr=False)  # smtp(s)://user:pass@host:port for mailto: channels
    watchdog_interval_s: float = 300.0  # how often a --watchdog channel gets its always-firing FleetWatchdog alert
    # web
    refresh_interval_ms: int = 5000
    rate_limit_config: str = "100/minute"
    rate_limit_api: str = "600/minute"
    web_url: str = ""  # the web app's address as people reach it (sign-in links); default http://<host>:<http_port>
    # single sign-on (OpenID Connect): all three or none
    oidc_issuer: str = ""  # https://…, the URL whose /.well-known/openid-configuration describes the provider
    oidc_client_id: str = ""
    oidc_client_secret: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
               "must be DEBUG, INFO, WARNING or ERROR", self.log_level)
        for name in ("mqtt_port", "mqtt_plain_port", "mqtt_service_port", "http_port"):
            value = getattr(self, name)
            _check(0 <= value <= 65535, name, "must be a port number 0-65535", value)
        _check(self.accept_rate >= 0, "accept_rate", "must be 0 (no limit) or more", self.accept_rate)
        _check(self.broker_loop in BROKER_LOOPS, "broker_loop", "must be asyncio or uvloop", self.broker_loop)
        _check(0 <= self.broker_coalesce_ms <= 100, "broker_coalesce_ms", "must be 0-100", self.broker_coalesce_ms)
        for name in ("reload_interval_s", "interval", "reconnect_max_s", "batch_interval_s",
                     "stale_factor", "history_raw_days", "history_rollup_days", "agent_rate_limit_per_s",
                     "lost_grace_s", "heartbeat_interval", "watchdog_interval_s"):
            value = getattr(self, name)
            _check(value > 0, name, "must be greater than 0", value)
        for name in ("ttl_seconds", "agent_queue_max_reports", "agent_queue_max_bytes", "max_queued_messages",
                     "service_queued_messages", "max_connections", "batch_max", "refresh_interval_ms",
                     "max_handshakes", "max_unsent_bytes"):
            value = getattr(self, name)
            _check(value >= 1, name, "must be a positive integer", value)
        _check(self.broker_durability in ("full", "normal", "off"), "broker_durability",
               "must be full, normal or off", self.broker_durability)
        _check(self.cert_days >= 1, "cert_days", "must be at least 1", self.cert_days)
        _check(self.reload_interval_s <= 5, "reload_interval_s", "must be at most 5 (changes apply within 5 s)",
               self.reload_interval_s)
        if self.web_url:
            parts = urlsplit(self.web_url)
            _check(parts.scheme in ("http", "https") and bool(parts.hostname), "web_url",
                   "must look like https://HOST[:PORT][/PATH]", self.web_url)
        if self.broker_url:
            parts = urlsplit(self.broker_url)
            _check(parts.scheme in ("mqtts", "mqtt") and bool(parts.hostname), "broker_url",
                   "must look like mqtts://HOST:PORT", self.broker_url)
            try:
                _ = parts.port  # urlsplit validates the port lazily
            except ValueError:
                _check(False, "broker_url", "has a bad port", self.broker_url)
        if self.cert_names:
            from fleet.config.tls import cert_name

            for name in self.cert_names:
                try:
                    cert_name(name)
                except ValueError:
                    _check(False, "cert_names", "each must be a DNS name or an IP address", name)
        for name in ("org",):
            value = getattr(self, name)
            _check(value == "" or is_valid_id(value), name, "must be a valid org id", value)
        _check(self.machine == "" or is_valid_id(self.machine), "machine", "must be a valid machine id", self.machine)
        for org in self.orgs:
            _check(is_valid_id(org), "orgs", "must be valid org ids", org)
        _check(len(set(self.processes)) <= MAX_PROCESS_CHECKS, "processes",
               f"at most {MAX_PROCESS_CHECKS} process checks", len(self.processes))
        for spec in self.processes:
            _check(is_check_name(spec) and spec != "re:", "processes",
                   "must be a process name or re:REGEX (printable, at most 256 characters)", spec)
            if spec.startswith("re:"):
                try:
                    re.compile(spec[3:])
                except re.error as exc:
                    _check(False, "processes", f"bad regex: {exc}", spec)
        if self.database_url:
            from fleet.store.database import DatabaseError, DatabaseUrl, redact

            try:
                DatabaseUrl.parse(self.database_url)
            except DatabaseError as exc:
                raise SettingsError(f"invalid setting database_url (FLEET_DATABASE_URL={redact(self.database_url)!r}):"
                                    f" {exc}") from None
        _check(0 <= self.alert_group_wait <= 3600, "alert_group_wait", "must be between 0 and 3600 seconds",
               self.alert_group_wait)
        if self.smtp_url:
            _check_smtp_url(self.smtp_url)
        # Takeover is within a lease, a poll and a broker connection: 15 s at most with the largest lease.
        _check(1 <= self.collector_lease_s <= 12, "collector_lease_s", "must be between 1 and 12 seconds",
               self.collector_lease_s)
        _check(self.heartbeat_method.upper() in ("GET", "POST"), "heartbeat_method", "must be GET or POST",
               self.heartbeat_method)
        if self.heartbeat_url:
            parts = urlsplit(self.heartbeat_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # The URL may hold a token (healthchecks.io's ping URLs do): the message never shows it.
                raise SettingsError("invalid setting heartbeat_url (FLEET_HEARTBEAT_URL): must be an http(s):// URL"
                                    " (value not shown)")
        _check_oidc(self)
        _check(self.instance == "" or (self.instance.isprintable() and len(self.instance) <= 128), "instance",
               "must be printable, at most 128 characters", self.instance)

    @property
    def oidc_enabled(self) -> bool:
        """Whether single sign-on is configured (the three oidc_* settings are set together or not at all)."""
        return bool(self.oidc_issuer)

    @property
    def instance_name(self) -> str:
        """This collector's name: ``instance``, or ``<hostname>:<pid>``."""
        return self.instance or f"{socket.gethostname()}:{os.getpid()}"

    # derived values -------------------------------------------------------------------------
    @property
    def db_path(self) -> Path:
        """Where the default SQLite database lives (``database`` is what the parts really open)."""
        return self.data_dir / "fleet.db"

    @property
    def database(self) -> str:
        """The database URL every part opens: ``database_url``, or SQLite's ``fleet.db`` in the data dir."""
        return self.database_url or f"sqlite:///{self.db_path}"

    @property
    def certs_dir(self) -> Path:
        """Where the development CA and server certificate live."""
        return self.data_dir / "certs"

    @property
    def ca_path(self) -> Path:
        """The CA clients verify the broker with."""
        return Path(self.ca) if self.ca else self.certs_dir / "ca.pem"

    @property
    def effective_broker_url(self) -> str:
        """The broker URL clients connect to: ``broker_url`` or the embedded broker's TLS listener."""
        if self.broker_url:
            return self.broker_url
        return f"mqtts://{local_host(self.host)}:{self.mqtt_port}"

    @property
    def agents_broker_url(self) -> str:
        """The broker URL to give agents: ``broker_url``, or the embedded broker at this machine's name when it
        listens on every interface (other machines cannot use 127.0.0.1)."""
        if self.broker_url or self.host not in WILDCARD_HOSTS:
            return self.effective_broker_url
        return f"mqtts://{socket.gethostname()}:{self.mqtt_port}"  # a name the server certificate holds

    @property
    def effective_web_url(self) -> str:
        """The web app's URL for links given to people: ``web_url``, or this host's HTTP listener."""
        if self.web_url:
            return self.web_url.rstrip("/")
        host = socket.gethostname() if self.host in WILDCARD_HOSTS else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    @property
    def service_port(self) -> int:
        """The embedded broker's listener reserved for the collector (always admitted, whatever the agents do):
        ``mqtt_service_port``, else 8884 beside the default 8883, else 0 (a free port, told to in-process parts)."""
        if self.mqtt_service_port:
            return self.mqtt_service_port
        return DEFAULT_SERVICE_PORT if self.mqtt_port == DEFAULT_MQTT_PORT else 0

    @property
    def collector_broker_url(self) -> str:
        """The broker URL the collector connects to: ``broker_url``, else the embedded broker's collector listener
        when its port is known, else its agents' listener."""
        if self.broker_url or not self.service_port:
            return self.effective_broker_url
        return f"mqtts://{local_host(self.host)}:{self.service_port}"

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


class _Invalid(Exception):
    pass


def _check(ok: bool, name: str, why: str, value: Any) -> None:
    if not ok:
        raise SettingsError(f"invalid setting {name} (FLEET_{name.upper()}={value!r}): {why}")


OIDC_SETTINGS = ("oidc_issuer", "oidc_client_id", "oidc_client_secret")
LOOPBACK_NAMES = ("localhost", "localhost.")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) names this machine's loopback interface."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def _variables(names: list[str]) -> str:
    return ", ".join(f"FLEET_{name.upper()}" for name in names)


def _check_oidc(settings: Settings) -> None:
    """Single sign-on needs its three settings together, an https issuer (http only on loopback, for tests)."""
    given = [name for name in OIDC_SETTINGS if getattr(settings, name)]
    if given and len(given) < len(OIDC_SETTINGS):
        missing = [name for name in OIDC_SETTINGS if name not in given]
        raise SettingsError(f"incomplete single sign-on settings: {_variables(given)} set but {_variables(missing)}"
                            " not (set all three or none)")
    if settings.oidc_issuer:
        try:
            parts = urlsplit(settings.oidc_issuer)
            _ = parts.port  # raises ValueError for a bad port
        except ValueError:
            parts = None
        _check(parts is not None and parts.scheme in ("https", "http") and bool(parts.hostname)
               and not parts.query and not parts.fragment and not parts.username, "oidc_issuer",
               "must be an https:// URL without query or fragment", settings.oidc_issuer)
        assert parts is not None
        # The client secret and the provider's keys travel over this: in clear text only within this machine.
        _check(parts.scheme == "https" or is_loopback(parts.hostname or ""), "oidc_issuer",
               "must be https:// (http:// only on loopback)", settings.oidc_issuer)
    _check(settings.oidc_client_id.isprintable() and len(settings.oidc_client_id) <= 255, "oidc_client_id",
           "must be printable, at most 255 characters", settings.oidc_client_id)
    if not (settings.oidc_client_secret.isprintable() and len(settings.oidc_client_secret) <= 1024):
        raise SettingsError("invalid setting oidc_client_secret (FLEET_OIDC_CLIENT_SECRET): must be printable,"
                            " at most 1024 characters (value not shown)")


def _check_smtp_url(url: str) -> None:
    # The URL holds the SMTP password: the message names the setting, never the value.
    why = "must look like smtp://user:password@host:587 or smtps://host:465 (value not shown)"
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise SettingsError(f"invalid setting smtp_url (FLEET_SMTP_URL): {why}") from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise SettingsError(f"invalid setting smtp_url (FLEET_SMTP_URL): {why}")


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_HINTS = typing.get_type_hints(Settings)


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/env/flag value to the setting's type; raise SettingsError naming the setting."""
    kind = _HINTS[name]
    if kind is Labels:
        return _coerce_labels(value)
    try:
        if kind is Path:
            if not isinstance(value, (str, os.PathLike)) or str(value) == "":
                raise _Invalid
            return Path(value)
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise _Invalid
        if kind is int:
            if isinstance(value, bool):
                raise _Invalid
            if isinstance(value, float):
                if not value.is_integer():
                    raise _Invalid
                return int(value)
            return int(str(value).strip())
        if kind is float:
            if isinstance(value, bool):
                raise _Invalid
            result = float(value if isinstance(value, (int, float)) else str(value).strip())
            if result != result or result in (float("inf"), float("-inf")):
                raise _Invalid
            return result
        if kind == tuple[str, ...]:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(str(item).strip() for item in items if str(item).strip())
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _Invalid
        return str(value)
    except (_Invalid, ValueError, TypeError):
        type_name = getattr(kind, "__name__", str(kind))
        raise SettingsError(
            f"invalid setting {name} (FLEET_{name.upper()}={value!r}): expected {type_name}"
        ) from None


def _coerce_labels(value: Any) -> Labels:
    """Labels from a TOML table, ``KEY=VALUE,...`` text (environment) or ``KEY=VALUE`` flags."""
    try:
        if isinstance(value, Labels):
            return value
        if isinstance(value, Mapping):
            return Labels.from_mapping(value)
        if isinstance(value, (list, tuple)):
            return Labels.parse(str(item) for item in value)
        return Labels.parse_text(str(value))
    except LabelError as exc:
        raise SettingsError(f"invalid setting labels (FLEET_LABELS={value!r}): {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # here, not at the top: most processes (the agent, 25 MB budget) have no file to read

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc
    # Allow a [fleet] table as well as top-level keys.
    if isinstance(data.get("fleet"), dict):
        data = {**{k: v for k, v in data.items() if k != "fleet"}, **data["fleet"]}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise SettingsError(f"unknown setting {unknown[0]!r} in {path} (known: {', '.join(sorted(FIELDS))})")
    return data


def load_settings(config_file: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None,
                  flags: Mapping[str, Any] | None = None) -> Settings:
    """Build Settings from defaults, a TOML file, ``FLEET_*`` variables and flags (None flags are ignored)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    config_file = config_file or env.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        for name, value in _read_toml(Path(config_file)).items():
            values[name] = _coerce(name, value)
    for name in FIELDS:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw)
    for name, value in (flags or {}).items():
        if name not in FIELDS:
            raise SettingsError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _coerce(name, value)
    return Settings(**values)
