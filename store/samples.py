"""How report history is stored (schema version 5): ids for machines, sessions and field lists, compact numbers.

A stored report (table ``samples``) names its machine, session and extra-field names by small ids;
``SampleIds`` finds or creates them inside the writer's transaction and remembers them once it commits. The
view ``reports`` reads the rows back under the old columns' names; ``extra_fields`` turns a row's
``field_names`` and ``field_values`` back into the report's ``{"custom.<series>": n, "process.<name>": n}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

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
ID_ROWS_PER_STATEMENT = 64  # new machines or sessions per INSERT
MAX_REMEMBERED = 100_000  # ids per cache of SampleIds: sessions keep coming as agents restart
_CENTI_LIMIT = 2**53  # beyond it a float has no fraction to keep, and an integer would not fit 64 bits
_NO_INVENTORY: tuple[float, Mapping[str, Any]] = (-math.inf, {})  # a machine's newest inventory when it has none
_MISSING = object()


def stored_number(engine: str, value: float | None) -> float | int | None:
    """How a percent or load value is written: on SQLite, exact hundredths as an integer (see store.schema, v5)."""
    return _stored_number_sqlite(value) if engine == SQLITE else value


def _stored_number_sqlite(value: float | None) -> float | int | None:
    if value is None or not -_CENTI_LIMIT < value < _CENTI_LIMIT:
        return value
    hundredths = round(value * 100)
    return hundredths if hundredths / 100 == value else value


def _as_is(value: float | None) -> float | None:
    return value


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


class Sample(NamedTuple):
    """One report as history keeps it, before its ids are known (a tuple: the writer makes one per report)."""

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
    system: Mapping[str, Any]  # the report's system inventory


class SampleIds:
    """Ids of machines, sessions and field lists, found or created in the caller's transaction.

    What a transaction finds is remembered at once (the writer looks every report up here) and undone by
    ``rollback()``; ``commit()`` keeps it. ``forget()`` drops everything, e.g. after retention deleted
    sessions. Each cache starts over past MAX_REMEMBERED entries.
    """

    def __init__(self) -> None:
        self.machines: dict[tuple[str, str], int] = {}
        self.sessions: dict[tuple[int, str], int] = {}
        self.fields: dict[tuple[str, ...], int] = {}
        self.inventory: dict[int, tuple[float, Mapping[str, Any]]] = {}  # machine -> its newest (ts, system)
        self._undo: list[tuple[dict, Any, Any]] = []  # (cache, key, value before) since the last commit

    def _set(self, cache: dict, key: Any, value: Any) -> None:
        self._undo.append((cache, key, cache.get(key, _MISSING)))
        cache[key] = value

    def commit(self) -> None:
        """The transaction committed: keep what it found."""
        self._undo.clear()
        for cache in (self.machines, self.sessions, self.fields, self.inventory):
            if len(cache) > MAX_REMEMBERED:
                cache.clear()

    def rollback(self) -> None:
        """The transaction rolled back: what it created does not exist."""
        for cache, key, before in reversed(self._undo):
            if before is _MISSING:
                cache.pop(key, None)
            else:
                cache[key] = before
        self._undo.clear()

    def forget(self) -> None:
        """Drop every remembered machine, session and inventory (rows may have been deleted)."""
        self.machines.clear()
        self.sessions.clear()
        self.inventory.clear()
        self._undo.clear()

    def add_machines(self, db: Database, keys: Iterable[tuple[str, str]]) -> None:
        """Find or create the ids of these (org, machine_id) keys (in chunks of a few statements)."""
        for key, (found, created) in _find_or_create(db, "report_machines", ("org", "machine_id"), keys).items():
            self._set(self.machines, key, found)
            if created:  # no inventory yet: no need to look
                self._set(self.inventory, found, _NO_INVENTORY)

    def add_sessions(self, db: Database, keys: Iterable[tuple[int, str]]) -> None:
        """Find or create the ids of these (machine id, session) keys."""
        for key, (found, _) in _find_or_create(db, "report_sessions", ("machine", "session"), keys).items():
            self._set(self.sessions, key, found)

    def field_set(self, db: Database, names: tuple[str, ...]) -> int:
        """The id of a list of extra-field names, created if new."""
        found = self.fields.get(names)
        if found is None:
            key = (field_names_text(names),)
            found = _find_or_create(db, "report_fields", ("names",), [key])[key][0]
            self._set(self.fields, names, found)
        return found

    def inventory_changed(self, db: Database, machine: int, ts: float, system: Mapping[str, Any]) -> bool:
        """Is ``system`` new for the machine at ``ts`` (different from its newest stored inventory, or the first)?

        A report older than the newest inventory (an agent's replay) changes nothing.
        """
        newest = self.inventory.get(machine)
        if newest is None:
            row = db.query_one("SELECT ts, system FROM inventory WHERE machine = ? ORDER BY ts DESC LIMIT 1",
                               (machine,))
            newest = (row[0], orjson.loads(row[1])) if row else _NO_INVENTORY
            self._set(self.inventory, machine, newest)
        if newest is not _NO_INVENTORY and (ts <= newest[0] or system == newest[1]):
            return False
        self._set(self.inventory, machine, (ts, system))
        return True


def _find_or_create(db: Database, table: str, columns: tuple[str, ...], keys: Iterable[tuple]
                    ) -> dict[tuple, tuple[int, bool]]:
    """{key: (id, created)}: new rows in multi-row INSERTs, then one SELECT for each key that existed."""
    keys = list(dict.fromkeys(keys))
    found: dict[tuple, tuple[int, bool]] = {}
    names, width = ", ".join(columns), len(columns)
    for start in range(0, len(keys), ID_ROWS_PER_STATEMENT):
        chunk = keys[start:start + ID_ROWS_PER_STATEMENT]
        # ON CONFLICT: another collector may create the same row at once (field lists are shared by all orgs).
        placeholders = ", ".join([f"({', '.join('?' * width)})"] * len(chunk))
        for row in db.query(f"INSERT INTO {table}({names}) VALUES {placeholders} ON CONFLICT DO NOTHING"
                            f" RETURNING id, {names}", [value for key in chunk for value in key]):
            found[tuple(row[1:])] = (int(row[0]), True)
    where = " AND ".join(f"{c} = ?" for c in columns)
    for key in keys:
        if key not in found:
            existing = db.query_one(f"SELECT id FROM {table} WHERE {where}", key)
            assert existing is not None
            found[key] = (int(existing[0]), False)
    return found


def sample_rows(db: Database, ids: SampleIds, samples: Sequence[Sample]) -> tuple[list[tuple], list[tuple]]:
    """The ``samples`` rows (SAMPLE_COLUMNS) and ``inventory`` rows (INVENTORY_COLUMNS) of ``samples``."""
    # The writer runs this for every report: known ids are dict lookups, and the first unknown one makes the
    # ids of every later report of the batch at once.
    number = _stored_number_sqlite if db.engine == SQLITE else _as_is
    machines, sessions = ids.machines, ids.sessions
    rows: list[tuple] = []
    changes: list[tuple] = []
    for i, s in enumerate(samples):
        machine = machines.get((s.org, s.machine_id))
        if machine is None:
            ids.add_machines(db, [(x.org, x.machine_id) for x in samples[i:] if (x.org, x.machine_id) not in machines])
            machine = machines[s.org, s.machine_id]
        session = sessions.get((machine, s.session))
        if session is None:
            later = [(machines[x.org, x.machine_id], x.session) for x in samples[i:]
                     if (x.org, x.machine_id) in machines]
            ids.add_sessions(db, [key for key in later if key not in sessions])
            session = sessions[machine, s.session]
        field_set: int | None = None
        values: str | None = None
        if s.field_names:
            field_set, values = ids.field_set(db, s.field_names), field_values_text(s.field_values)
        rows.append((machine, session, s.seq, s.ts, s.received, number(s.cpu_percent), number(s.memory_percent),
                     number(s.disk_percent), number(s.load1), s.net_bytes_sent, s.net_bytes_recv, field_set, values))
        if ids.inventory_changed(db, machine, s.ts, s.system):
            changes.append((machine, s.ts, s.received, orjson.dumps(s.system, option=orjson.OPT_SORT_KEYS).decode()))
    return rows, changes


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
