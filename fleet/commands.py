"""The ``fleet`` commands: a thin click layer over the parts' library functions.

The entry point is fleet/cli.py. Errors raised by any part become one line on stderr and exit code 1 in
``fleet.launch.run_with_settings``, which every command runs through.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fleet.config.settings import Settings
from fleet.launch import AGENT_OPTIONS, CONFIG, DATA_DIR, run_agent, run_with_settings


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
    from fleet.config import credentials

    created = credentials.add_org(settings.data_dir, name, settings.database)
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
    from fleet.config import credentials

    names = credentials.list_orgs(settings.data_dir, settings.database)
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
    from fleet.config import credentials

    credentials.remove_org(settings.data_dir, name, settings.database)
    click.echo(f"removed org {name}")


@org.command("rotate")
@click.argument("name")
@click.option("--role", type=click.Choice(("agent", "reader")), required=True)
@click.option("--json", "as_json", is_flag=True)
@database
@common
def org_rotate(settings: Settings, name: str, role: str, as_json: bool) -> None:
    """Replace one key of ORG; the old key is refused at once."""
    from fleet.config import credentials

    key = credentials.rotate_key(settings.data_dir, name, role, settings.database)
    if as_json:
        click.echo(json.dumps({"org": name, "role": role, "key": key}))
    else:
        click.echo(f"{role}_key: {key}")


# --- parts ----------------------------------------------------------------------------------
def _host(func: Callable) -> Callable:
    return click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")(func)


def _broker_url(func: Callable) -> Callable:
    return click.option("--broker", "broker_url", default=None,
                        help="Broker URL, mqtts://HOST:PORT (default: the embedded broker).")(func)


@cli.command()
@_host
@click.option("--mqtt-port", type=int, default=None, help="MQTT/TLS port (default 8883).")
@click.option("--http-port", type=int, default=None, help="HTTP port (default 8080).")
@click.option("--demo", type=click.IntRange(min=0), default=None,
              help="Also run org 'demo' with this machine's agent and N simulated agents.")
@database
@common
@settings_flags("host", "mqtt_port", "http_port")
def up(settings: Settings, demo: int | None) -> None:
    """Run the embedded broker, the collector and the web app in one process."""
    from fleet.up import run_up

    run_up(settings, demo=demo)


@cli.command()
@_host
@click.option("--mqtt-port", type=int, default=None, help="MQTT/TLS port (default 8883).")
@database
@common
@settings_flags("host", "mqtt_port")
def broker(settings: Settings) -> None:
    """Run the embedded MQTT broker alone."""
    from fleet.broker.server import serve

    serve(settings)


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

    serve(settings)


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
@common
@settings_flags("broker_url", "org", "key", "ca", "interval")
def simulate(settings: Settings, agents: int, duration: float | None, prefix: str, connect_rate: float,
             record_path: Path | None) -> None:
    """Load generator: N simulated agents speaking the real protocol."""
    from fleet.agent.simulate import run_simulation

    run_simulation(settings, agents=agents, duration=duration, prefix=prefix, connect_rate=connect_rate,
                   record_path=record_path)


@cli.command("mosquitto-config")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for mosquitto.conf, the password file and the ACL file.")
@click.option("--mqtt-port", type=int, default=None)
@_host
@database
@common
@settings_flags("mqtt_port", "host")
def mosquitto_config(settings: Settings, out_dir: Path) -> None:
    """Export the access model (users, ACL, TLS listener) as Mosquitto configuration."""
    from fleet.broker.mosquitto import write_config

    for path in write_config(settings, out_dir):
        click.echo(str(path))
