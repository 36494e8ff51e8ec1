"""Running a ``fleet`` command once its arguments are known, without click.

Errors raised by any part become one line on stderr and exit code 1, here and only here. The click
application (fleet/commands.py) runs every command through ``run_with_settings``; ``fleet agent`` with a
plain command line skips click altogether (fleet/cli.py), parsed by ``parse_agent_args`` from the
same option table the click command is built from. ``fleet broker`` and ``fleet collector`` run their
part through ``serve_alone``, which tunes the process for it.
"""

from __future__ import annotations

import gc
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from fleet.agent.errors import AgentError
from fleet.broker.errors import BrokerError
from fleet.collector.errors import CollectorError
from fleet.config.errors import ConfigError
from fleet.config.settings import Settings, load_settings
from fleet.logs import setup_logging
from fleet.notify.errors import NotifyError
from fleet.store.errors import StoreError
from fleet.web.errors import WebError

USER_ERRORS = (ConfigError, StoreError, BrokerError, AgentError, CollectorError, NotifyError, WebError, OSError)
GC_YOUNG_THRESHOLD = 20_000


def fail(message: str) -> None:
    """Exit 1 with ``fleet: error: <message>`` on stderr."""
    print(f"fleet: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_with_settings(func: Callable[..., Any], config_file: str | None, flags: dict[str, Any],
                      **kwargs: Any) -> Any:
    """Build Settings (flag > environment > file > default), set up logging, and call ``func(settings=…)``."""
    try:
        settings = load_settings(config_file, flags=flags)
        setup_logging(settings.log_level)
        return func(settings=settings, **kwargs)
    except USER_ERRORS as exc:
        fail(str(exc) or type(exc).__name__)
    except KeyboardInterrupt:
        sys.exit(130)


def collect_garbage_less_often() -> None:
    """Raise the cyclic GC's young threshold (process-wide) to GC_YOUNG_THRESHOLD; idempotent.

    Only for a process that runs the broker or the collector alone (``serve_alone``, ``bench/ingest.py``):
    ``fleet up`` shares its process with the web and keeps Python's defaults (docs/collector.md, docs/broker.md).
    """
    # Both parts keep many long-lived containers (the broker's connections, the collector's queued reports),
    # which the default threshold (700) has the GC walk again and again; docs/benchmarks.md has the figures.
    young, older, oldest = gc.get_threshold()
    if young and young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve_alone(serve: Callable[[Settings], None], settings: Settings) -> None:
    """Run one part's ``serve(settings)`` as the only part of this process: ``fleet broker``, ``fleet collector``."""
    collect_garbage_less_often()
    serve(settings)


def run_agent(settings: Any, once: bool, print_only: bool) -> None:
    """``fleet agent``: run until stopped, then exit with the agent's code."""
    from fleet.agent.runner import run

    sys.exit(run(settings, once=once, print_only=print_only))


class Option(NamedTuple):
    """One option of ``fleet agent``: its flag, the keyword it fills, its type, and its help."""

    flag: str
    dest: str
    kind: type
    help: str
    setting: bool = True  # a Settings field (flag > environment > file > default), not a plain argument


AGENT_OPTIONS = (
    Option("--broker", "broker_url", str, "Broker URL, mqtts://HOST:PORT (default: the embedded broker)."),
    Option("--org", "org", str, "Org this machine reports to."),
    Option("--key", "key", str, "The org's agent key (or FLEET_KEY)."),
    Option("--enrol", "enrol", str, "Enrolment token: the first start makes this machine's certificate."),
    Option("--machine", "machine", str, "Machine id (default: sanitised hostname)."),
    Option("--ca", "ca", str, "CA file to verify the broker."),
    Option("--interval", "interval", float, "Seconds between reports (default 10)."),
    Option("--textfile-dir", "textfile_dir", str, "Directory of *.prom files (Prometheus text format) to report."),
    Option("--process", "processes", tuple, "Count processes named NAME, or matching re:REGEX (repeatable)."),
    Option("--label", "labels", tuple, "Label KEY=VALUE sent in every report (repeatable; setting labels)."),
    Option("--once", "once", bool, "Send (or print) one report and exit.", setting=False),
    Option("--print", "print_only", bool, "Print reports as JSON instead of publishing.", setting=False),
)
# What every command takes besides (fleet/commands.py declares them as click.Path options).
DATA_DIR, CONFIG = "--data-dir", "--config"


def _usable(path: str, directory: bool) -> bool:
    """What click.Path(file_okay=False) / click.Path(dir_okay=False) accepts: absent, or readable and right."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return True
    return (stat.S_ISDIR(mode) == directory) and os.access(path, os.R_OK)


def parse_agent_args(args: list[str]) -> dict[str, Any] | None:
    """The arguments click would pass for ``fleet agent ARGS``, or None when click should parse ARGS itself.

    Only the plain forms are taken: each known option at most once, as ``--opt value`` or ``--opt=value``,
    with a valid value. Everything else (``--help``, unknown or repeated options, a bad number or path)
    returns None, so click gives its usual answer and exit code.
    """
    options = {option.flag: option for option in AGENT_OPTIONS}
    params: dict[str, Any] = {option.dest: False if option.kind is bool else None for option in AGENT_OPTIONS}
    repeatable = {option.flag for option in AGENT_OPTIONS if option.kind is tuple}
    params.update(data_dir=None, config_file=None)
    seen: set[str] = set()
    rest = list(args)
    while rest:
        flag, has_value, value = rest.pop(0).partition("=")
        if (flag in seen and flag not in repeatable) or (flag not in options and flag not in (DATA_DIR, CONFIG)):
            return None
        seen.add(flag)
        option = options.get(flag)
        if option is not None and option.kind is bool:
            if has_value:
                return None
            params[option.dest] = True
            continue
        if not has_value:
            if not rest:
                return None
            value = rest.pop(0)
        if flag == DATA_DIR:
            if not _usable(value, directory=True):
                return None
            params["data_dir"] = Path(value)
        elif flag == CONFIG:
            if not _usable(value, directory=False):
                return None
            params["config_file"] = value
        elif option is None:  # unreachable: every other flag is an option
            return None
        elif option.kind is tuple:
            params[option.dest] = (*(params[option.dest] or ()), value)
        elif option.kind is float:
            try:
                params[option.dest] = float(value)
            except ValueError:
                return None
        else:
            params[option.dest] = value
    return params


def run_agent_args(params: dict[str, Any]) -> None:
    """Run ``fleet agent`` with what ``parse_agent_args`` returned, as the click command would."""
    flags = {option.dest: params[option.dest] for option in AGENT_OPTIONS if option.setting}
    flags["data_dir"] = params["data_dir"]
    run_with_settings(run_agent, params["config_file"], flags, once=params["once"], print_only=params["print_only"])
