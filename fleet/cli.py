"""The ``fleet`` command's entry point (``fleet.cli:main``, ``python -m fleet.cli``).

The commands are a click application (fleet/commands.py). ``fleet agent`` runs on every machine with
an RSS budget of 25 MB (docs/benchmarks.md), which importing click would eat into, so a plain ``fleet agent``
command line is parsed without importing click (fleet/launch.py). Anything else, including ``--help``
and every usage error, goes to click.

Nothing is imported here at module level that the agent's imports would bring anyway: the agent's
process first puts agent/deferred.py's stand-ins in place (``prepare_agent_process``), and only the
agent's, since they are process-wide and pay only against its RSS budget.
"""

from __future__ import annotations

import os
import sys
from typing import Any


def prepare_agent_process() -> None:
    """What ``fleet agent`` does before importing anything else: stand-ins for modules it never uses."""
    from fleet.agent.deferred import defer_unused

    defer_unused()  # before dataclasses, urllib.parse, ssl and paho import them


def main(argv: list[str] | None = None) -> None:
    """Run ``fleet ARGV`` (default: the process's arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["agent"] and "_FLEET_COMPLETE" not in os.environ:  # not click's shell completion
        prepare_agent_process()
        from fleet.launch import parse_agent_args, run_agent_args

        params = parse_agent_args(args[1:])
        if params is not None:
            run_agent_args(params)
            return
    from fleet.commands import cli

    cli(args, prog_name="fleet")


def __getattr__(name: str) -> Any:
    if name == "cli":  # the click group, for callers that import it from here
        from fleet.commands import cli

        return cli
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
