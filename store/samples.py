"""How report history is stored (schema version 5): ids for machines, sessions and field lists, compact numbers.

A stored report (table ``samples``) names its machine, session and extra-field names by small ids;
``SampleIds`` finds or creates them inside the writer's transaction and remembers them once it commits. The
view ``reports`` reads the rows back under the old columns' names; ``extra_fields`` turns a row's
``field_names`` and ``field_values`` back into the report's ``{"custom.<series>": n, "process.<name>": n}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from fleet.store.schema import SQLITE

if TYPE_CHECKING:  # store.database runs the conversion of old history, which writes through this module
    from fleet.store.database import Database

SAMPLE_COLUMNS = ("machine", "session", "seq", "ts", "received", "cpu_percent", "memory_percent", "disk_percent",
                  "load1", "net_bytes_sent", "net_bytes_recv", "field_set", "field_values")
# Columns of the view ``reports`` that hold a report's values (the ids and keys aside).
REPORT_VALUES = ("org", "machine_id", "session", "seq", "ts", "received", "cpu_percent", "memory_percent",
                 "disk_percent", "load1", "net_bytes_sent", "net_bytes_recv")
INVENTORY_COLUMNS = ("machine", "ts", "received", "system")
MAX_REMEMBERED = 100_000  # ids per cache of SampleIds: sessions keep coming as agents restart
_CENTI_LIMIT = 2**53  # beyond it a float has no fraction to keep, and an integer would not fit 64 bits


def stored_number(engine: str, value: float | None) -> float | int | None:
    """How a percent or load value is written: on SQLite, exact hundredths as an integer (see store.schema, v5)."""
    if value is None or engine != SQLITE:
        return value
    hundredths = round(value * 100) if -_CENTI_LIMIT < value < _CENTI_LIMIT else None
    return hundredths if hundredths is not None and hundredths / 100 == value else value


def field_names_text(names: Sequence[str]) -> str:
    """The stored form of a list of extra-field names (report_fields.names)."""
    return orjson.dumps(list(names)).decode()


def field_values_text(values: Sequence[float | int]) -> str:
    """The stored form of a report's extra-field values (samples.field_values), in the order of its names."""
    return orjson.dumps(list(values)).decode()


def extra_fields(names: str | None, values: str | None) -> dict[str, Any]:
    """A stored row's extra fields as ``{name: value}`` (empty when it has none or they cannot be read)."""
    if not names or not values:
        return {}
    try:
        return dict(zip(orjson.loads(names), orjson.loads(values), strict=True))
    except (ValueError, TypeError):
        return {}


@dataclass(frozen=True, slots=True)
class Sample:
    """One report as history keeps it, before its ids are known."""

    org: str
    machine_id: str
    session: str
    seq: int
    ts: float
    received: float
    cpu_percent: float | None
    memory_percent: float | None
    disk_percent: float | None
    load1: float | None
    net_bytes_sent: int | None
    net_bytes_recv: int | None
    field_names: tuple[str, ...]  # () when the report has no extra fields
    field_values: tuple[float | int, ...]
    system: str  # the report's system inventory as JSON with sorted keys


class SampleIds:
    """Ids of machines, sessions and field lists, found or created in the caller's transaction.

    Ids made or read in a transaction are remembered only when ``commit()`` is called after it commits;
    ``rollback()`` forgets them. ``forget()`` drops everything, e.g. after retention deleted sessions.
    """

    def __init__(self) -> None:
        self._machines: dict[tuple[str, str], int] = {}
        self._sessions: dict[tuple[int, str], int] = {}
        self._fields: dict[tuple[str, ...], int] = {}
        self._inventory: dict[int, tuple[float, str]] = {}  # machine -> (ts, system) of its newest inventory
        self._pending: dict[tuple[int, Any], tuple[dict, Any]] = {}  # (id(cache), key) -> (cache, value)

    def _get(self, cache: dict, key: Any) -> Any:
        staged = self._pending.get((id(cache), key))
        return staged[1] if staged is not None else cache.get(key)

    def _remember(self, cache: dict, key: Any, value: Any) -> None:
        self._pending[(id(cache), key)] = (cache, value)

    def commit(self) -> None:
        """The transaction committed: keep what it found (a cache past MAX_REMEMBERED starts over)."""
        for (_, key), (cache, value) in self._pending.items():
            if len(cache) >= MAX_REMEMBERED:
                cache.clear()
            cache[key] = value
        self._pending.clear()

    def rollback(self) -> None:
        """The transaction rolled back: what it created does not exist."""
        self._pending.clear()

    def forget(self) -> None:
        """Drop every remembered machine, session and inventory (rows may have been deleted)."""
        self._machines.clear()
        self._sessions.clear()
        self._inventory.clear()
        self._pending.clear()

    def machine(self, db: Database, org: str, machine_id: str) -> int:
        """The id of (org, machine_id), created if new."""
        key = (org, machine_id)
        found = self._get(self._machines, key)
        if found is None:
            found = _find_or_create(db, "report_machines", ("org", "machine_id"), key)
            self._remember(self._machines, key, found)
        return found

    def session(self, db: Database, machine: int, session: str) -> int:
        """The id of a machine's session, created if new."""
        key = (machine, session)
        found = self._get(self._sessions, key)
        if found is None:
            found = _find_or_create(db, "report_sessions", ("machine", "session"), key)
            self._remember(self._sessions, key, found)
        return found

    def fields(self, db: Database, names: tuple[str, ...]) -> int:
        """The id of a list of extra-field names, created if new."""
        found = self._get(self._fields, names)
        if found is None:
            found = _find_or_create(db, "report_fields", ("names",), (field_names_text(names),))
            self._remember(self._fields, names, found)
        return found

    def inventory_changed(self, db: Database, machine: int, ts: float, system: str) -> bool:
        """Is ``system`` new for the machine at ``ts`` (different from its newest stored inventory, or the first)?

        A report older than the newest inventory (an agent's replay) changes nothing.
        """
        newest = self._get(self._inventory, machine)
        if newest is None:
            row = db.query_one("SELECT ts, system FROM inventory WHERE machine = ? ORDER BY ts DESC LIMIT 1",
                               (machine,))
            newest = (row[0], row[1]) if row else None
        if newest is not None and (ts <= newest[0] or system == newest[1]):
            self._remember(self._inventory, machine, newest)
            return False
        self._remember(self._inventory, machine, (ts, system))
        return True


def _find_or_create(db: Database, table: str, columns: tuple[str, ...], key: tuple) -> int:
    where = " AND ".join(f"{c} = ?" for c in columns)
    row = db.query_one(f"SELECT id FROM {table} WHERE {where}", key)
    if row is None:
        # ON CONFLICT: another collector may create the same row at once (field lists are shared by all orgs).
        db.execute(f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
                   " ON CONFLICT DO NOTHING", key)
        row = db.query_one(f"SELECT id FROM {table} WHERE {where}", key)
    assert row is not None
    return int(row[0])


def sample_rows(db: Database, ids: SampleIds, samples: Sequence[Sample]) -> tuple[list[tuple], list[tuple]]:
    """The ``samples`` rows (SAMPLE_COLUMNS) and ``inventory`` rows (INVENTORY_COLUMNS) of ``samples``."""
    engine = db.engine
    rows: list[tuple] = []
    inventory: list[tuple] = []
    for s in samples:
        machine = ids.machine(db, s.org, s.machine_id)
        field_set = ids.fields(db, s.field_names) if s.field_names else None
        rows.append((machine, ids.session(db, machine, s.session), s.seq, s.ts, s.received,
                     stored_number(engine, s.cpu_percent), stored_number(engine, s.memory_percent),
                     stored_number(engine, s.disk_percent), stored_number(engine, s.load1), s.net_bytes_sent,
                     s.net_bytes_recv, field_set, field_values_text(s.field_values) if field_set else None))
        if ids.inventory_changed(db, machine, s.ts, s.system):
            inventory.append((machine, s.ts, s.received, s.system))
    return rows, inventory


def write_samples(db: Database, ids: SampleIds, samples: Sequence[Sample]) -> int:
    """Store reports (inside the caller's transaction); returns how many were new (replays are ignored)."""
    rows, inventory = sample_rows(db, ids, samples)
    if inventory:
        db.insert_many("inventory", INVENTORY_COLUMNS, _unique_inventory(inventory), "DO NOTHING")
    return db.insert_many("samples", SAMPLE_COLUMNS, rows, "DO NOTHING")


def _unique_inventory(rows: list[tuple]) -> list[tuple]:
    # insert_many's ON CONFLICT may not meet one key twice in a statement (PostgreSQL refuses it).
    return list({(row[0], row[1]): row for row in rows}.values())


def machine_inventory(db: Database, org: str, machine_id: str) -> list[dict[str, Any]]:
    """A machine's inventory changes, oldest first: ``{"ts", "received", "system", "changed"}``.

    ``changed`` maps each key that differs from the previous inventory to ``[before, after]`` (None for a key
    that was absent); the first inventory has every key.
    """
    rows = db.query("SELECT i.ts, i.received, i.system FROM inventory i JOIN report_machines m ON m.id = i.machine"
                    " WHERE m.org = ? AND m.machine_id = ? ORDER BY i.ts", (org, machine_id))
    out: list[dict[str, Any]] = []
    before: Mapping[str, Any] = {}
    for ts, received, text in rows:
        system = orjson.loads(text)
        changed = {k: [before.get(k), system.get(k)] for k in sorted({*before, *system})
                   if before.get(k) != system.get(k)}
        out.append({"ts": ts, "received": received, "system": system, "changed": changed})
        before = system
    return out
