"""docs/protocol.md, the users' reference, is kept true by this test: it reads the doc's tables and checks them
against the code in both directions where it can, so a command, route, topic, setting or file added to one and
not the other fails here with a message naming it.

The doc's tables keep one name in backticks in their first column; that is what is read here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from fleet.agent import metrics as agent_metrics
from fleet.agent import runner as agent_runner
from fleet.agent.identity import IdentityFiles
from fleet.broker import server as broker_server
from fleet.broker.pki import ensure_certs, server_chain
from fleet.collector.alerts.engine import AlertEngine
from fleet.commands import cli
from fleet.config import enrolment, payloads, topics
from fleet.config.labels import Labels
from fleet.config.settings import Settings
from fleet.store import credentials
from fleet.up import DEMO_KEYS_FILE
from fleet.web import db as web_db
from fleet.web import metrics as web_metrics
from fleet.web.app import create_app

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
EVERY_COMMAND = ("--data-dir", "--config")  # documented once, above the commands table
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$")
CELL_SPLIT = re.compile(r"(?<!\\)\|")
CODE = re.compile(r"`([^`]+)`")


# --- reading the doc ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the section headed ``title``, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        found = HEADING.match(line)
        if found and found.group(2) == title:
            level = len(found.group(1))
            body = []
            for rest in lines[i + 1:]:
                nxt = HEADING.match(rest)
                if nxt and len(nxt.group(1)) <= level:
                    break
                body.append(rest)
            return "\n".join(body)
    raise AssertionError(f"docs/protocol.md has no section headed {title!r}")


def table(text: str, title: str) -> list[list[str]]:
    """The cells of the first table in section ``title``, header and separator left out."""
    rows: list[list[str]] = []
    for line in section(text, title).splitlines():
        if line.startswith("|"):
            rows.append([cell.strip() for cell in CELL_SPLIT.split(line.strip()[1:-1])])
        elif rows:
            break
    assert len(rows) > 2, f"docs/protocol.md: section {title!r} has no table"
    return rows[2:]


def names(cell: str) -> list[str]:
    """The backticked names of a cell."""
    return [name.replace("\\|", "|") for name in CODE.findall(cell)]


def first_names(text: str, title: str) -> dict[str, list[str]]:
    """Each row of the section's table by the backticked name in its first column."""
    rows: dict[str, list[str]] = {}
    for row in table(text, title):
        found = names(row[0])
        assert found, f"docs/protocol.md, {title!r}: a row without a backticked first column: {row[0]!r}"
        for name in found:
            assert name not in rows, f"docs/protocol.md, {title!r}: {name!r} is listed twice"
            rows[name] = row
    return rows


def compare(what: str, documented: set[str], actual: set[str]) -> None:
    """Fail naming what the code has and the doc lacks, and what the doc lists and the code lacks."""
    missing, extra = sorted(actual - documented), sorted(documented - actual)
    problems = []
    if missing:
        problems.append(f"not documented in docs/protocol.md: {', '.join(missing)}")
    if extra:
        problems.append(f"documented in docs/protocol.md but not in the code: {', '.join(extra)}")
    assert not problems, f"{what}: " + "; ".join(problems)


# --- commands ----------------------------------------------------------------------------------------------
def cli_commands(group: click.Group = cli, prefix: str = "fleet") -> dict[str, click.Command]:
    """Every runnable command of the click app, by its full name (``fleet alert channel add``)."""
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(cli_commands(command, f"{prefix} {name}"))
        else:
            found[f"{prefix} {name}"] = command
    return found


def long_options(command: click.Command) -> set[str]:
    return {opt for param in command.params if isinstance(param, click.Option)
            for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


def test_every_command_is_documented_and_every_documented_command_exists(doc: str) -> None:
    compare("fleet commands", set(first_names(doc, "Commands")), set(cli_commands()))


def test_each_commands_options_and_arguments_are_the_documented_ones(doc: str) -> None:
    rows = first_names(doc, "Commands")
    problems = []
    for name, command in cli_commands().items():
        if name not in rows:
            continue  # the test above names it
        options = long_options(command)
        lacking = [flag for flag in EVERY_COMMAND if flag not in options]
        if lacking:
            problems.append(f"{name} lacks {', '.join(lacking)}, which the doc says every command takes")
        documented = set(re.findall(r"--[a-z][a-z-]*", rows[name][1]))
        actual = options - set(EVERY_COMMAND)
        if documented != actual:
            problems.append(f"{name}: options not documented {sorted(actual - documented)}, "
                            f"documented but not taken {sorted(documented - actual)}")
        # Positional arguments come first in the synopsis, in capitals: ``ORG CHANNEL URL [--json]``.
        leading = re.match(r"((?:[A-Z][A-Z_]*\s*)*)", rows[name][1].strip("` ")).group(1).split()
        arguments = [param for param in command.params if isinstance(param, click.Argument)]
        if len(leading) != len(arguments):
            problems.append(f"{name}: {len(arguments)} arguments, the doc shows {leading}")
    assert not problems, "docs/protocol.md, Commands:\n" + "\n".join(problems)


# --- HTTP --------------------------------------------------------------------------------------------------
def route_key(method: str, rule: str) -> str:
    """``GET /api/fleet/<>``: path variables compared by position only (``<machine>``, ``<int:alert_id>``)."""
    return f"{method} {re.sub(r'<[^>]*>', '<>', rule)}"


def test_every_route_is_documented_and_every_documented_route_exists(doc: str, tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "fleet-data"))
    actual = {route_key(method, rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    documented = set()
    for name in first_names(doc, "Endpoints"):
        method, _, path = name.partition(" ")
        documented.add(route_key(method, path))
    compare("HTTP endpoints", documented, actual)


def test_the_machine_object_fields_are_the_apis(doc: str) -> None:
    # GET /api/fleet/<machine> adds ``derived`` to the stored columns (web.db.get_machine).
    served = {*web_db.MACHINE_COLUMNS, *web_db.IDENTITY_FIELDS, "derived"}
    compare("machine object fields", set(first_names(doc, "The machine object")), served)


def test_the_metrics_families_are_the_ones_served(doc: str) -> None:
    served = dict(re.findall(r'_family\(\s*lines,\s*"(fleet_\w+)",\s*"(\w+)"', inspect.getsource(web_metrics)))
    rows = first_names(doc, "/metrics")
    compare("/metrics families", set(rows), set(served))
    wrong = [f"{name} is a {kind}" for name, kind in served.items() if name in rows and rows[name][1] != kind]
    assert not wrong, "docs/protocol.md, /metrics: wrong type: " + ", ".join(wrong)


# --- MQTT --------------------------------------------------------------------------------------------------
def placeholder(text: str) -> str:
    """A concrete topic or name with ``acme``/``web-1`` written back as ``<org>``/``<machine>``."""
    return text.replace("acme", "<org>").replace("web-1", "<machine>")


def test_the_topics_are_config_topics(doc: str) -> None:
    templates = {topics.REPORT_TEMPLATE, topics.PING_TEMPLATE, topics.ALERT_TEMPLATE}
    assert {t.format(org="acme", machine="web-1") for t in templates} == {
        topics.report_topic("acme", "web-1"), topics.ping_topic("acme", "web-1"), topics.alert_topic("acme", "web-1")}
    actual = {t.format(org="<org>", machine="<machine>") for t in templates}
    assert {t.rsplit("/", 1)[1] for t in actual} == {*topics.KINDS, topics.ALERT_KIND}
    actual |= {placeholder(enrolment.exchange_topic("acme", "web-1", kind)) for kind in enrolment.EXCHANGE_KINDS}
    compare("MQTT topics", set(first_names(doc, "Topics")), actual)


def test_the_filters_and_names_are_config_topics(doc: str) -> None:
    mqtt = re.sub(r"```.*?```", "", section(doc, "MQTT"), flags=re.S)  # names in prose and tables, not examples
    spans = set(names(mqtt))
    expected = {
        "reader filter": placeholder(topics.org_filter("acme")),
        "agent filter": placeholder(topics.machine_filter("acme", "web-1")),
        "agent client id": placeholder(topics.agent_client_id("acme", "web-1")),
        "agent user": placeholder(credentials.username_for("acme", "agent")),
        "reader user": placeholder(credentials.username_for("acme", "reader")),
        "service user": credentials.SERVICE_USERNAME,
        "certificate subject": placeholder(enrolment.subject_name("acme", "web-1")),
        "enrolment user": placeholder(enrolment.enrol_username("acme", "0123456789abcdef")).replace(
            "0123456789abcdef", "<token id>"),
        **{f"collector filter ({kind})": topics.every_org_filter(kind) for kind in topics.KINDS},
        **{f"shard filter ({kind})": placeholder(topics.org_kind_filter("acme", kind)) for kind in topics.KINDS},
    }
    missing = [f"{what} {value!r}" for what, value in expected.items() if value not in spans]
    assert not missing, "docs/protocol.md, MQTT, does not name: " + ", ".join(missing)
    users = set(first_names(doc, "Users"))
    compare("MQTT users", users, {expected[name] for name in ("agent user", "reader user", "service user",
                                                              "certificate subject", "enrolment user")})


def examples(text: str) -> list[tuple[str, str, Any]]:
    """(kind, topic, decoded JSON) of each ``<!-- example: KIND TOPIC -->`` and the json block after it."""
    found = re.findall(r"<!-- example: (\w+) (\S+) -->\s*```json\n(.*?)```", text, re.S)
    return [(kind, topic, json.loads(body)) for kind, topic, body in found]


def test_the_examples_pass_the_collectors_checks(doc: str) -> None:
    found = examples(doc)
    assert {kind for kind, _, _ in found} == {"report", "ping", "alert"}, "docs/protocol.md: an example is missing"
    for kind, topic, value in found:
        raw = json.dumps(value).encode()
        if kind == "report":
            payloads.parse_report(raw, topic)
        elif kind == "ping":
            payloads.parse_ping(raw, topic)
        else:
            keys = set(re.findall(r'"(\w+)":', inspect.getsource(AlertEngine.take_publishes)))
            assert isinstance(value, list), "the alert example is a JSON list"
            assert value, "the alert example lists an alert"
            optional = {"acked_by"}  # only on an acknowledged alert
            for alert in value:
                assert keys - optional <= set(alert) <= keys, (
                    f"alert example {alert} has not the keys the collector sends: {keys}")
            assert optional <= {key for alert in value for key in alert}, "the alert example shows every key"


def test_the_report_and_ping_fields_are_the_agents(doc: str) -> None:
    report = payloads.build_report("web-1", "0x1", "s1", 0, 1.0, {}, {})
    compare("report fields", set(first_names(doc, "report")), set(report))
    pings = [payloads.build_ping("web-1", "0x1", "s2", "online", 10.0, ts=1.0, prev=("s1", 3)),
             payloads.build_ping("web-1", "0x1", "s2", "offline", 10.0, reason="lost")]
    compare("ping fields", set(first_names(doc, "ping")), {key for ping in pings for key in ping})

    metric_names = {name for name, _ in agent_metrics.COLLECTORS} | {name for name, _ in agent_metrics.FIELD_GROUPS}
    metric_names.add("process_counts")  # process_fields (the "processes" group) also fills process_counts
    system_names = set(agent_metrics.system_info("0x1"))
    rows = first_names(doc, "report")
    for field, expected in (("metrics", metric_names), ("system", system_names)):
        unnamed = sorted(expected - set(names(rows[field][1])))
        assert not unnamed, f"docs/protocol.md, report: the {field} row does not name {', '.join(unnamed)}"
    report_example = next(value for kind, _, value in examples(doc) if kind == "report")
    compare("metrics of the report example", set(report_example["metrics"]), metric_names)
    compare("system of the report example", set(report_example["system"]), system_names)


# --- settings and files ------------------------------------------------------------------------------------
def toml_value(value: Any) -> Any:
    """A default as TOML reads it: a path as a string, a tuple as a list."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Labels):
        return value.as_dict()
    return value


def test_every_setting_is_documented_with_its_variable_and_default(doc: str) -> None:
    rows = first_names(doc, "Settings")
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    compare("settings", set(rows), set(fields))
    problems = []
    for name, field in fields.items():
        if name not in rows:
            continue
        env, default = names(rows[name][1]), names(rows[name][2])
        if env != [f"FLEET_{name.upper()}"]:
            problems.append(f"{name}: environment variable is FLEET_{name.upper()}, the doc says {env}")
        expected = toml_value(field.default)
        try:
            documented = tomllib.loads(f"v = {default[0]}")["v"] if default else None
        except tomllib.TOMLDecodeError:
            documented = None
        if documented != expected or type(documented) is not type(expected):
            problems.append(f"{name}: default is {expected!r}, the doc says {default}")
    assert not problems, "docs/protocol.md, Settings:\n" + "\n".join(problems)


def test_every_file_of_the_data_dir_is_documented(doc: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    certs = ensure_certs(settings.certs_dir)
    files = IdentityFiles(tmp_path, "acme", "web-1")
    made = {settings.db_path, tmp_path / credentials.PEPPER_FILE, tmp_path / credentials.SERVICE_KEY_FILE,
            tmp_path / DEMO_KEYS_FILE, *(Path(path) for path in dataclasses.astuple(certs)), server_chain(certs),
            files.key, files.cert, files.ca}
    actual = {placeholder(path.relative_to(tmp_path).as_posix()) for path in made}
    # Named in code as literals: read from the source, so a rename fails here.
    for module, literal, documented in ((broker_server, 'data_dir / "broker.db"', "broker.db"),
                                        (agent_runner, 'f"agent-{settings.org}-{machine}.db"',
                                         "agent-<org>-<machine>.db")):
        assert literal in inspect.getsource(module), f"{module.__name__} no longer makes {literal}: update the doc"
        actual.add(documented)
    compare("files in the data dir", set(first_names(doc, "Files in the data dir")), actual)
