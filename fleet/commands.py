"""The ``fleet`` commands: a thin click layer over the parts' library functions.

The entry point is fleet/cli.py. Errors raised by any part become one line on stderr and exit code 1 in
``fleet.launch.run_with_settings``, which every command runs through.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fleet.config.settings import Settings
from fleet.launch import AGENT_OPTIONS, CONFIG, DATA_DIR, run_agent, run_with_settings, serve_alone

if TYPE_CHECKING:
    from fleet.store.database import Database


def common(func: Callable) -> Callable:
    """Add ``--data-dir`` and ``--config`` to a command and pass it built Settings as ``settings``."""

    @click.option(DATA_DIR, "data_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data directory (default ./fleet-data, or FLEET_DATA_DIR).")
    @click.option(CONFIG, "config_file", type=click.Path(dir_okay=False), default=None,
                  help="TOML settings file (or FLEET_CONFIG).")
    @functools.wraps(func)
    def wrapper(data_dir: Path | None, config_file: str | None, **kwargs: Any) -> Any:
        flag_names = (*getattr(wrapper, "setting_flags", ()), "database_url")
        flags = {name: kwargs.pop(name) for name in flag_names if name in kwargs}
        flags["data_dir"] = data_dir
        return run_with_settings(func, config_file, flags, **kwargs)

    return wrapper


def database(func: Callable) -> Callable:
    """Add ``--database URL`` (setting ``database_url``) to a command that touches the database."""
    return click.option("--database", "database_url", default=None, metavar="URL",
                        help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB "
                             "(or FLEET_DATABASE_URL; default sqlite:///DATA_DIR/fleet.db).")(func)


def cli_actor() -> str:
    """Who the audit log names for a change made with this command: ``cli:<unix user>``."""
    from fleet.store.audit import cli_actor as actor

    return actor()


def _database(settings: Settings) -> Database:
    """The command's database connection (``with _database(settings) as db:`` closes it)."""
    from fleet.store.database import open_database

    return open_database(settings.database)


def settings_flags(*names: str) -> Callable:
    """Mark which keyword arguments of a command are settings (flag > env > file > default)."""

    def mark(func: Callable) -> Callable:
        func.setting_flags = names  # type: ignore[attr-defined]
        return func

    return mark


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", prog_name="fleet")
def cli() -> None:
    """Fleet telemetry over MQTT: agent, broker, collector and web."""


# --- orgs -----------------------------------------------------------------------------------
@cli.group()
def org() -> None:
    """Manage orgs and their keys."""


@org.command("add")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as a JSON object.")
@database
@common
def org_add(settings: Settings, name: str, as_json: bool) -> None:
    """Create ORG and print its agent and reader keys (shown once)."""
    from fleet.store import credentials

    with _database(settings) as db:
        created = credentials.add_org(db, settings.data_dir, name, actor=cli_actor())
    if as_json:
        click.echo(json.dumps(created.as_dict()))
    else:
        click.echo(f"org:        {created.org}")
        click.echo(f"agent_key:  {created.agent_key}")
        click.echo(f"reader_key: {created.reader_key}")
        click.echo("Store these keys now: only their hashes are kept.", err=True)


@org.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def org_list(settings: Settings, as_json: bool) -> None:
    """List orgs."""
    from fleet.store import orgs

    with _database(settings) as db:
        names = orgs.list_orgs(db)
    if as_json:
        click.echo(json.dumps(names))
    else:
        for name in names:
            click.echo(name)


@org.command("remove")
@click.argument("name")
@database
@common
def org_remove(settings: Settings, name: str) -> None:
    """Remove ORG: its keys stop working (history is kept until retention ends)."""
    from fleet.store import credentials

    with _database(settings) as db:
        credentials.remove_org(db, name, actor=cli_actor())
    click.echo(f"removed org {name}")


@org.command("rotate")
@click.argument("name")
@click.option("--role", type=click.Choice(("agent", "reader")), required=True)
@click.option("--json", "as_json", is_flag=True)
@database
@common
def org_rotate(settings: Settings, name: str, role: str, as_json: bool) -> None:
    """Replace one key of ORG; the old key is refused at once."""
    from fleet.store import credentials

    with _database(settings) as db:
        key = credentials.rotate_key(db, settings.data_dir, name, role, actor=cli_actor())
    if as_json:
        click.echo(json.dumps({"org": name, "role": role, "key": key}))
    else:
        click.echo(f"{role}_key: {key}")


@org.command("set")
@click.argument("name")
@click.option("--agent-key", type=click.Choice(("on", "off")), required=True,
              help="off: the org agent key is refused; only enrolled machines connect.")
@database
@common
def org_set(settings: Settings, name: str, agent_key: str) -> None:
    """Change a setting of ORG (applies within 5 s)."""
    from fleet.store import identity

    with _database(settings) as db:
        identity.set_agent_key(db, name, agent_key == "on", actor=cli_actor())
    click.echo(f"org {name}: agent key {agent_key}")


# --- machine identity -----------------------------------------------------------------------
@cli.group()
def enrol() -> None:
    """Enrolment tokens: each enrolled machine gets its own certificate."""


@enrol.command("create")
@click.argument("org_name", metavar="ORG")
@click.option("--uses", type=click.IntRange(min=0), default=1, show_default=True,
              help="Enrolments the token is good for (0: any number until it expires).")
@click.option("--expires", default="24h", show_default=True, help="How long the token is good for: 30m, 24h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@database
@common
def enrol_create(settings: Settings, org_name: str, uses: int, expires: str, as_json: bool) -> None:
    """Make an enrolment token for ORG (shown once) and the agent command line that uses it."""
    from fleet.config.enrolment import agent_command
    from fleet.config.rules import parse_duration
    from fleet.store import identity

    fingerprint = identity.installation_ca_fingerprint(settings.certs_dir)
    with _database(settings) as db:
        made = identity.create_token(db, settings.data_dir, fingerprint, org_name, uses, parse_duration(expires),
                                     actor=cli_actor())
    if as_json:
        click.echo(json.dumps(made.as_dict()))
        return
    click.echo(f"token: {made.token}")
    click.echo(f"Install an agent with:\n  {agent_command(settings.agents_broker_url, org_name, str(made.token))}")
    click.echo("Store the token now: only its hash is kept.", err=True)


@enrol.command("list")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def enrol_list(settings: Settings, org_name: str, as_json: bool) -> None:
    """List ORG's enrolment tokens (never the tokens themselves)."""
    from fleet.store import identity

    with _database(settings) as db:
        rows = identity.list_tokens(db, org_name)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        state = "revoked" if r["revoked"] else f"{r['used']}/{r['uses'] or 'any'} used"
        click.echo(f"{r['id']}  {state}  expires {_when(r['expires_at'])}")


@enrol.command("revoke")
@click.argument("org_name", metavar="ORG")
@click.argument("token_id", metavar="ID")
@database
@common
def enrol_revoke(settings: Settings, org_name: str, token_id: str) -> None:
    """Revoke an enrolment token: it enrols nothing more."""
    from fleet.store import identity

    with _database(settings) as db:
        identity.revoke_token(db, org_name, token_id, actor=cli_actor())
    click.echo(f"revoked enrolment token {token_id}")


@cli.group()
def machine() -> None:
    """Machines of an org: their credentials and labels."""


@machine.command("list")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def machine_list(settings: Settings, org_name: str, as_json: bool) -> None:
    """List ORG's machines: how each authenticates, its certificate's serial and end."""
    from fleet.store import identity

    with _database(settings) as db:
        rows = identity.list_machines(db, org_name)
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        cert = f"serial {r['serial']} until {_when(r['not_after'])}" if r["serial"] else ""
        click.echo(f"{r['machine_id']}  {r['auth']}{'  REVOKED' if r['revoked'] else ''}  {cert}".rstrip())


@machine.command("revoke")
@click.argument("org_name", metavar="ORG")
@click.argument("machine_name", metavar="MACHINE")
@database
@common
def machine_revoke(settings: Settings, org_name: str, machine_name: str) -> None:
    """Revoke MACHINE's certificate: its connection closes and it is refused within 5 s (history stays)."""
    from fleet.store import identity

    with _database(settings) as db:
        identity.revoke_machine(db, org_name, machine_name, actor=cli_actor())
    click.echo(f"revoked the certificate of {org_name}/{machine_name}")


@machine.command("forget")
@click.argument("org_name", metavar="ORG")
@click.argument("machine_name", metavar="MACHINE")
@database
@common
def machine_forget(settings: Settings, org_name: str, machine_name: str) -> None:
    """Forget MACHINE: gone from the live view now and from the collector within its refresh (history stays)."""
    from fleet.store.forgotten import forget_machine

    with _database(settings) as db:
        forget_machine(db, org_name, machine_name, actor=cli_actor())
    click.echo(f"forgot machine {org_name}/{machine_name}")


# --- parts ----------------------------------------------------------------------------------
def _host(func: Callable) -> Callable:
    return click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")(func)


def _cert_name(func: Callable) -> Callable:
    # Not given at all = None, so FLEET_CERT_NAMES or the file still counts.
    return click.option("--cert-name", "cert_names", multiple=True, metavar="NAME",
                        callback=lambda _ctx, _param, value: value or None,
                        help="Another name of the server certificate: a DNS name or an IP address (repeatable).")(func)


def _echo_identity(certs_dir: Path) -> None:
    """Print the server certificate's names and its CA's fingerprint, as clients will check them."""
    from fleet.broker.pki import cert_paths, server_identity

    for line in server_identity(cert_paths(certs_dir)).lines():
        click.echo(line)


def _broker_url(func: Callable) -> Callable:
    return click.option("--broker", "broker_url", default=None,
                        help="Broker URL, mqtts://HOST:PORT (default: the embedded broker).")(func)


@cli.command()
@_host
@_cert_name
@click.option("--mqtt-port", type=int, default=None, help="MQTT/TLS port (default 8883).")
@click.option("--http-port", type=int, default=None, help="HTTP port (default 8080).")
@click.option("--demo", type=click.IntRange(min=0), default=None,
              help="Also run org 'demo' with this machine's agent and N simulated agents.")
@database
@common
@settings_flags("host", "cert_names", "mqtt_port", "http_port")
def up(settings: Settings, demo: int | None) -> None:
    """Run the embedded broker, the collector and the web app in one process."""
    from fleet.up import run_up

    run_up(settings, demo=demo)


@cli.command()
@_host
@_cert_name
@click.option("--mqtt-port", type=int, default=None, help="MQTT/TLS port (default 8883).")
@database
@common
@settings_flags("host", "cert_names", "mqtt_port")
def broker(settings: Settings) -> None:
    """Run the embedded MQTT broker alone."""
    from fleet.broker.server import BrokerHandle, serve

    def started(handle: BrokerHandle) -> None:
        url = settings.replace(mqtt_port=handle.port).effective_broker_url
        click.echo(f"  MQTT broker:  {url}   (CA: {settings.ca_path.resolve()})")
        _echo_identity(settings.certs_dir)

    serve_alone(functools.partial(serve, on_started=started), settings)


@cli.command()
@_broker_url
@click.option("--org", "orgs", default=None, help="Only these orgs (comma-separated), to shard collectors.")
@click.option("--ca", default=None, help="CA file to verify the broker (default DATA_DIR/certs/ca.pem).")
@database
@common
@settings_flags("broker_url", "orgs", "ca")
def collector(settings: Settings) -> None:
    """Run the collector alone."""
    from fleet.collector.service import serve

    serve_alone(serve, settings)


@cli.command()
@_host
@click.option("--http-port", type=int, default=None, help="HTTP port (default 8080).")
@_broker_url
@click.option("--ca", default=None, help="CA file to verify the broker (default DATA_DIR/certs/ca.pem).")
@database
@common
@settings_flags("host", "http_port", "broker_url", "ca")
def web(settings: Settings) -> None:
    """Run the web app (API, metrics, dashboard) alone, served by waitress."""
    from fleet.web.server import serve

    serve(settings)


def _agent_options(func: Callable) -> Callable:
    for option in reversed(AGENT_OPTIONS):  # fleet/launch.py parses the same options without click
        if option.kind is bool:
            func = click.option(option.flag, option.dest, is_flag=True, help=option.help)(func)
        elif option.kind is tuple:  # repeatable; not given at all = None, so the environment or file still counts
            func = click.option(option.flag, option.dest, multiple=True, help=option.help,
                                callback=lambda _ctx, _param, value: value or None)(func)
        else:
            func = click.option(option.flag, option.dest, type=option.kind, default=None, help=option.help)(func)
    return func


@cli.command()
@_agent_options
@common
@settings_flags(*(option.dest for option in AGENT_OPTIONS if option.setting))
def agent(settings: Settings, once: bool, print_only: bool) -> None:
    """Run the agent: publish this machine's metrics and presence."""
    run_agent(settings, once=once, print_only=print_only)


@cli.command()
@_broker_url
@click.option("--org", default=None, help="Org the simulated machines report to.")
@click.option("--key", default=None, help="The org's agent key.")
@click.option("--enrol", default=None, help="Enrolment token: each simulated machine enrols and connects with its"
                                            " own certificate (kept in --data-dir).")
@click.option("--agents", type=click.IntRange(min=1), required=True, help="Number of simulated agents.")
@click.option("--ca", default=None, help="CA file to verify the broker.")
@click.option("--interval", type=float, default=None, help="Seconds between reports (default 10).")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--prefix", default="sim", show_default=True,
              help="Machine names are PREFIX-0001…: give each process its own to run several on one org.")
@click.option("--connect-rate", type=click.FloatRange(min=0, min_open=True), default=200.0, show_default=True,
              help="First connects a second: they are spread, with jitter, over AGENTS / RATE seconds.")
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one line per report published and per PUBACK to this file (for loss accounting).")
@click.option("--labels", "spread", default="", metavar="SPREAD",
              help="Labels spread over the machines, every combination in turn: 'env=prod,dev;role=web,db'.")
@common
@settings_flags("broker_url", "org", "key", "enrol", "ca", "interval")
def simulate(settings: Settings, agents: int, duration: float | None, prefix: str, connect_rate: float,
             record_path: Path | None, spread: str) -> None:
    """Load generator: N simulated agents speaking the real protocol."""
    from fleet.agent.simulate import run_simulation
    from fleet.config.labels import Spread

    run_simulation(settings, agents=agents, duration=duration, prefix=prefix, connect_rate=connect_rate,
                   record_path=record_path, spread=Spread.parse(spread) if spread else None)


@cli.command("mosquitto-config")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for mosquitto.conf, the password file and the ACL file.")
@click.option("--mqtt-port", type=int, default=None)
@click.option("--cert-port", "mqtt_cert_port", type=int, default=None,
              help="Port of the listener for machine certificates (default: MQTT port + 1).")
@click.option("--watch", is_flag=True, help="Keep running: apply org, key, token and certificate changes to the"
                                            " running Mosquitto within 5 s (files rewritten, SIGHUP).")
@_host
@_cert_name
@database
@common
@settings_flags("mqtt_port", "mqtt_cert_port", "host", "cert_names")
def mosquitto_config(settings: Settings, out_dir: Path, watch: bool) -> None:
    """Export the access model (users, ACL, TLS listeners, CRL) as Mosquitto configuration."""
    import signal
    import threading

    from fleet.broker.mosquitto import kick_machine, write_config
    from fleet.broker.mosquitto import watch as watch_changes

    for path in write_config(settings, out_dir):
        click.echo(str(path))
    _echo_identity(settings.certs_dir)
    if watch:
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        watch_changes(settings, out_dir, None, stop, lambda org, machine: kick_machine(settings, org, machine))


# --- alerts ---------------------------------------------------------------------------------
@cli.group()
def alert() -> None:
    """Alert rules, notification channels and silences of an org."""


@alert.command("add")
@click.argument("org_name", metavar="ORG")
@click.argument("rule_name", metavar="RULE")
@click.option("--when", "when", required=True,
              help="'status == offline', 'status == stale', 'conflict' or 'FIELD OP NUMBER' (e.g. 'cpu_percent > 90').")
@click.option("--for", "for_", default="0s", show_default=True, help="How long the condition must hold: 30s, 5m, 2h.")
@click.option("--machines", default="*", show_default=True,
              help="Glob over machine ids ('web-*') or label selector ('env=prod,role!=db').")
@click.option("--severity", type=click.Choice(("warning", "critical")), default="warning", show_default=True)
@database
@common
def alert_add(settings: Settings, org_name: str, rule_name: str, when: str, for_: str, machines: str,
              severity: str) -> None:
    """Add alert rule RULE to ORG."""
    from fleet.config import rules
    from fleet.store import alerting

    rule = rules.Rule.parse(org_name, rule_name, when, for_, machines, severity)
    with _database(settings) as db:
        alerting.add_rule(db, rule, actor=cli_actor())
    if isinstance(rule.when, rules.Threshold) and rule.when.field not in rules.KNOWN_FIELDS \
            and not rule.when.field.startswith((rules.CUSTOM_PREFIX, rules.PROCESS_PREFIX)):
        click.echo(f"note: {rule.when.field!r} is not a standard field; the rule holds only for machines whose "
                   "reports carry a numeric field of that name", err=True)
    click.echo(f"added rule {rule_name} to org {org_name}: {rule.when} for {rules.format_duration(rule.for_s)}")


@alert.command("list")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def alert_list(settings: Settings, org_name: str, as_json: bool) -> None:
    """List the alert rules of ORG."""
    from fleet.config import rules
    from fleet.store import alerting

    with _database(settings) as db:
        found = alerting.list_rules(db, org_name)
    if as_json:
        click.echo(json.dumps([rule.as_dict() for rule in found]))
        return
    rows = [(r.name, str(r.when), rules.format_duration(r.for_s), r.machines, r.severity) for r in found]
    _table(("RULE", "WHEN", "FOR", "MACHINES", "SEVERITY"), rows)


@alert.command("remove")
@click.argument("org_name", metavar="ORG")
@click.argument("rule_name", metavar="RULE")
@database
@common
def alert_remove(settings: Settings, org_name: str, rule_name: str) -> None:
    """Remove alert rule RULE of ORG (its alerts resolve)."""
    from fleet.store import alerting

    with _database(settings) as db:
        alerting.remove_rule(db, org_name, rule_name, actor=cli_actor())
    click.echo(f"removed rule {rule_name} of org {org_name}")


def _table(headers: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    cells = [tuple(headers)] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


def _when(ts: float | None) -> str | None:
    import time

    return None if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@alert.group("channel")
def alert_channel() -> None:
    """Where an org's notifications go: webhooks, Alertmanager, email, Apprise URLs."""


@alert_channel.command("add")
@click.argument("org_name", metavar="ORG")
@click.argument("channel_name", metavar="CHANNEL")
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help='Print {"org", "channel", "secret"}.')
@click.option("--watchdog", is_flag=True,
              help="Also send the always-firing FleetWatchdog alert every 5 minutes (webhook, Alertmanager).")
@database
@common
def alert_channel_add(settings: Settings, org_name: str, channel_name: str, url: str, as_json: bool,
                      watchdog: bool) -> None:
    """Add CHANNEL to ORG: http(s):// webhook, alertmanager+http(s)://HOST:PORT, mailto:ADDR or an Apprise URL."""
    from fleet.notify.channels import add_channel

    added = add_channel(settings, org_name, channel_name, url, watchdog, actor=cli_actor())
    if as_json:
        click.echo(json.dumps(added.as_dict()))
        return
    click.echo(f"added {added.kind} channel {channel_name} to org {org_name}")
    if added.secret is not None:
        click.echo(f"secret: {added.secret}")
        click.echo("Store this signing secret now (X-Fleet-Signature: sha256=HMAC of the body); it is not shown again.",
                   err=True)


@alert_channel.command("list")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def alert_channel_list(settings: Settings, org_name: str, as_json: bool) -> None:
    """List the channels of ORG with their last delivery and last error (never a secret)."""
    from fleet.store import alerting

    with _database(settings) as db:
        found = alerting.list_channels(db, org_name)
    if as_json:
        click.echo(json.dumps([channel.as_dict() for channel in found]))
        return
    rows = [(c.name, c.kind, c.target, _when(c.last_delivery), c.failures,
             None if c.last_error is None else f"{_when(c.last_error_at)} {c.last_error}") for c in found]
    _table(("CHANNEL", "KIND", "TARGET", "LAST DELIVERY", "FAILURES", "LAST ERROR"), rows)


@alert_channel.command("remove")
@click.argument("org_name", metavar="ORG")
@click.argument("channel_name", metavar="CHANNEL")
@database
@common
def alert_channel_remove(settings: Settings, org_name: str, channel_name: str) -> None:
    """Remove CHANNEL of ORG (with what was waiting to be sent to it)."""
    from fleet.store import alerting

    with _database(settings) as db:
        alerting.remove_channel(db, org_name, channel_name, actor=cli_actor())
    click.echo(f"removed channel {channel_name} of org {org_name}")


@alert_channel.command("test")
@click.argument("org_name", metavar="ORG")
@click.argument("channel_name", metavar="CHANNEL")
@database
@common
def alert_channel_test(settings: Settings, org_name: str, channel_name: str) -> None:
    """Send one test notification to CHANNEL; exit 1 with the reason if it fails."""
    from fleet.notify.channels import send_test

    send_test(settings, org_name, channel_name, actor=cli_actor())
    click.echo(f"test notification delivered to channel {channel_name} of org {org_name}")


@alert.command("silence")
@click.argument("org_name", metavar="ORG")
@click.option("--for", "for_", required=True, help="How long: 30m, 2h, 1d.")
@click.option("--machines", default="*", show_default=True,
              help="Glob over machine ids ('web-*') or label selector ('env=prod,role!=db').")
@click.option("--rule", "rule_name", default=None, help="Only this rule's alerts (default: every rule).")
@click.option("--comment", default="", help="Why (shown with the silence).")
@click.option("--json", "as_json", is_flag=True, help='Print {"id", "ends_at"}.')
@database
@common
def alert_silence(settings: Settings, org_name: str, for_: str, machines: str, rule_name: str | None, comment: str,
                  as_json: bool) -> None:
    """Send no notifications for ORG's matching alerts for a while (they still show everywhere)."""
    from fleet.config import rules
    from fleet.store import alerting

    with _database(settings) as db:
        silence = alerting.add_silence(db, org_name, rules.parse_duration(for_), machines, rule_name, comment,
                                        actor=cli_actor())
    if as_json:
        click.echo(json.dumps({"id": silence.id, "ends_at": silence.ends_at}))
    else:
        click.echo(f"silence {silence.id} of org {org_name} until {_when(silence.ends_at)}")


@alert.command("unsilence")
@click.argument("org_name", metavar="ORG")
@click.argument("silence_id", metavar="ID", type=int)
@database
@common
def alert_unsilence(settings: Settings, org_name: str, silence_id: int) -> None:
    """End silence ID of ORG now."""
    from fleet.store import alerting

    with _database(settings) as db:
        alerting.expire_silence(db, org_name, silence_id, actor=cli_actor())
    click.echo(f"silence {silence_id} of org {org_name} ended")


@alert.command("silences")
@click.argument("org_name", metavar="ORG")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def alert_silences(settings: Settings, org_name: str, as_json: bool) -> None:
    """List the current and future silences of ORG."""
    from fleet.store import alerting

    with _database(settings) as db:
        found = alerting.list_silences(db, org_name)
    if as_json:
        click.echo(json.dumps([silence.as_dict() for silence in found]))
        return
    rows = [(s.id, s.rule or "*", s.machines, _when(s.ends_at), s.comment) for s in found]
    _table(("ID", "RULE", "MACHINES", "ENDS", "COMMENT"), rows)


# --- export and database upkeep ----------------------------------------------------------------------------------
_TIME_HELP = "Unix seconds or an ISO 8601 time (UTC unless it has an offset), e.g. 2025-01-31T12:00:00Z."


@cli.command()
@click.argument("org_name", metavar="ORG")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The file to write; its suffix picks the format: .db (SQLite: history, events, alerts), "
                   ".csv (history) or .json (all three).")
@click.option("--since", default=None, metavar="T", help=f"Only from this time on. {_TIME_HELP}")
@click.option("--until", default=None, metavar="T", help=f"Only up to this time. {_TIME_HELP}")
@click.option("--force", is_flag=True, help="Replace FILE if it exists (without it, an existing FILE is refused).")
@database
@common
def export(settings: Settings, org_name: str, out: Path, since: str | None, until: str | None, force: bool) -> None:
    """Export ORG's history, events and alerts to a standalone file (sqlite-utils and Datasette open a .db)."""
    from fleet.store.export import export_org, parse_time

    result = export_org(settings.database, org_name, out,
                        since=None if since is None else parse_time(since, "--since"),
                        until=None if until is None else parse_time(until, "--until"), force=force)
    what = _count(result.history, "history row")
    if result.format != ".csv":
        what += f", {_count(result.events, 'event')} and {_count(result.alerts, 'alert')}"
    click.echo(f"exported {what} of org {org_name} to {result.path}")


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


@cli.group("db")
def db_group() -> None:
    """Inspect the database; SQLite upkeep."""


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    units = ("B", "kB", "MB", "GB")
    power = 0
    while value >= 1000 and power < len(units) - 1:
        value /= 1000
        power += 1
    return f"{value:.0f} B" if power == 0 else f"{value:.1f} {units[power]}"


@db_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (sizes in bytes).")
@database
@common
def db_info(settings: Settings, as_json: bool) -> None:
    """Schema version, tables with row counts and sizes, and the database's and WAL's size."""
    from fleet.store.maintenance import database_info

    info = database_info(settings.database)
    if as_json:
        click.echo(json.dumps(info.as_dict()))
        return
    click.echo(f"database:        {info.database}")
    click.echo(f"schema version:  {info.schema_version}")
    click.echo(f"size:            {_bytes(info.database_bytes)}"
               + ("" if info.free_bytes is None else f" ({_bytes(info.free_bytes)} free)"))
    if info.wal_bytes is not None:
        click.echo(f"WAL:             {_bytes(info.wal_bytes)}")
    if info.history_days is not None:
        click.echo(f"history:         {info.history_days:.1f} days"
                   + ("" if info.bytes_per_report is None else f", {info.bytes_per_report:.0f} bytes per report"))
    click.echo("")
    _table(("TABLE", "ROWS", "SIZE"), [(t.name, t.rows, _bytes(t.bytes)) for t in info.tables])


@db_group.command("vacuum")
@database
@common
def db_vacuum(settings: Settings) -> None:
    """SQLite upkeep: VACUUM, ANALYZE and empty the WAL (writers wait meanwhile). PostgreSQL: use autovacuum."""
    from fleet.store.maintenance import vacuum

    result = vacuum(settings.database)
    click.echo(f"vacuumed {result.database}: {_bytes(result.database_bytes_before)} -> "
               f"{_bytes(result.database_bytes_after)}, WAL {_bytes(result.wal_bytes_before)} -> "
               f"{_bytes(result.wal_bytes_after)}")
    if not result.wal_truncated:
        click.echo("note: another connection kept the WAL from being emptied; it is emptied at its next checkpoint",
                   err=True)


@machine.command("label")
@click.argument("org_name", metavar="ORG")
@click.argument("machine_id", metavar="MACHINE")
@click.argument("pairs", metavar="LABEL...", nargs=-1)
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Remove the server label KEY (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine's labels as JSON.")
@database
@common
def machine_label(settings: Settings, org_name: str, machine_id: str, pairs: tuple[str, ...],
                  remove: tuple[str, ...], as_json: bool) -> None:
    """Set server labels (each LABEL KEY=VALUE) of MACHINE of ORG, winning over the agent's; --remove KEY drops one."""
    from fleet.store.labels import set_labels

    if not pairs and not remove:
        raise click.UsageError("give KEY=VALUE labels to set or --remove KEY")
    with _database(settings) as db:
        labels = set_labels(db, org_name, machine_id, pairs, remove, actor=cli_actor())
    if as_json:
        click.echo(json.dumps({"machine_id": machine_id, "labels": labels}))
    else:
        click.echo(f"machine {machine_id} of org {org_name}: "
                   + (",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"))


# --- people ---------------------------------------------------------------------------------
ROLE_CHOICE = click.Choice(("viewer", "operator", "admin"))


@cli.group()
def user() -> None:
    """Manage people: accounts and their roles per org (changes apply to signed-in sessions within 5 s)."""


def _roles_of(orgs: tuple[str, ...], roles: tuple[str, ...]) -> dict[str, str]:
    """``--org``/``--role`` pairs in the order given; without any --role every org gets viewer."""
    if roles and len(roles) != len(orgs):
        raise click.UsageError("give one --role per --org (or none: viewer)")
    return dict(zip(orgs, roles or ("viewer",) * len(orgs), strict=True))


def _password_from_stdin() -> str:
    """The password piped in: the first line of standard input, without its line ending."""
    import sys

    return sys.stdin.readline().rstrip("\r\n")


def _orgs_text(orgs: dict[str, str]) -> str:
    return ", ".join(f"{org}={role}" for org, role in sorted(orgs.items())) or "no orgs"


@user.command("add")
@click.argument("email")
@click.option("--org", "orgs", multiple=True, metavar="ORG", help="An org the person gets a role in (repeatable).")
@click.option("--role", "roles", multiple=True, type=ROLE_CHOICE,
              help="The role in the --org at the same position (repeatable; default viewer).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input instead of printing"
                                                     " a sign-in link.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@database
@common
def user_add(settings: Settings, email: str, orgs: tuple[str, ...], roles: tuple[str, ...], password_stdin: bool,
             as_json: bool) -> None:
    """Add a person; without --password-stdin, print a sign-in link (valid 24 h) where they choose a password."""
    from fleet.store import accounts, audit

    roles_by_org = _roles_of(orgs, roles)
    password = _password_from_stdin() if password_stdin else None
    with _database(settings) as db:
        added = accounts.add_user(db, email, roles_by_org, password, audit.cli_actor())
    link = added.invitation.url(settings.effective_web_url) if added.invitation else None
    expires = added.invitation.expires_at if added.invitation else None
    if as_json:
        click.echo(json.dumps({**added.person.as_dict(), "link": link, "expires_at": expires}))
        return
    click.echo(f"added {added.person.email} ({_orgs_text(added.person.orgs)})")
    if link is not None:
        click.echo(f"sign-in link (valid 24 h, once): {link}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def user_list(settings: Settings, as_json: bool) -> None:
    """List people with their roles."""
    from fleet.store import people

    with _database(settings) as db:
        found = people.list_people(db)
    if as_json:
        click.echo(json.dumps(found))
        return
    for person in found:
        pending = "" if person["password"] else "  (no password yet)"
        click.echo(f"{person['email']}  {_orgs_text(person['orgs'])}{pending}")


@user.command("remove")
@click.argument("email")
@database
@common
def user_remove(settings: Settings, email: str) -> None:
    """Remove a person; their sessions and tokens stop working."""
    from fleet.store import accounts, audit

    with _database(settings) as db:
        person = accounts.remove_user(db, email, audit.cli_actor())
    click.echo(f"removed {person.email}")


@user.command("grant")
@click.argument("email")
@click.argument("org_name", metavar="ORG")
@click.argument("role", type=ROLE_CHOICE)
@database
@common
def user_grant(settings: Settings, email: str, org_name: str, role: str) -> None:
    """Give a person ROLE in ORG (replacing their role there)."""
    from fleet.store import accounts, audit

    with _database(settings) as db:
        before = accounts.grant_role(db, email, org_name, role, audit.cli_actor())
    click.echo(f"{email.strip().lower()}: {role} in org {org_name}" + (f" (was {before})" if before else ""))


@user.command("revoke")
@click.argument("email")
@click.argument("org_name", metavar="ORG")
@database
@common
def user_revoke(settings: Settings, email: str, org_name: str) -> None:
    """Take away a person's role in ORG (and their API tokens there)."""
    from fleet.store import accounts, audit

    with _database(settings) as db:
        before = accounts.revoke_role(db, email, org_name, audit.cli_actor())
    click.echo(f"{email.strip().lower()}: no role in org {org_name} (was {before})")


@cli.command("audit")
@click.argument("org_name", metavar="ORG")
@click.option("--since", default=None, metavar="T", help="From this time: Unix seconds or ISO 8601 (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@database
@common
def audit_log(settings: Settings, org_name: str, since: str | None, as_json: bool) -> None:
    """The audit log of ORG: every change made through the web or the CLI, oldest first."""
    from datetime import UTC, datetime

    from fleet.store import audit
    from fleet.store.export import parse_time
    from fleet.store.orgs import require_org

    start = parse_time(since, "--since") if since is not None else None
    with _database(settings) as db:
        require_org(db, org_name)
        found = audit.entries(db, org_name, start)
    if as_json:
        click.echo(json.dumps(found))
        return
    for entry in found:
        when = datetime.fromtimestamp(entry["ts"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        detail = json.dumps(entry["detail"], sort_keys=True) if entry["detail"] else ""
        click.echo(f"{when}  {entry['actor']}  {entry['action']}  {entry['target']}  {detail}".rstrip())
