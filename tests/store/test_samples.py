"""store/samples.py: numbers read back exactly as sent, and the ids SampleIds remembers only once committed."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.store import samples
from fleet.store.database import open_database, sqlite_url
from fleet.store.samples import SampleIds, stored_number
from tests.dbhelpers import insert_reports, sample

_seq = itertools.count()


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory):
    db = open_database(sqlite_url(tmp_path_factory.mktemp("samples") / "fleet.db"))
    yield db
    db.close()


def test_two_decimals_take_an_integer_and_anything_else_stays_a_float():
    assert stored_number("sqlite", 12.3) == 1230
    assert stored_number("sqlite", 0.52) == 52
    assert stored_number("sqlite", 100.0) == 10000
    assert type(stored_number("sqlite", 12.345)) is float
    assert type(stored_number("sqlite", 1e300)) is float
    assert stored_number("postgresql", 12.3) == 12.3
    assert stored_number("sqlite", None) is None


@given(value=st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                       st.integers(-10**6, 10**6).map(lambda n: n / 100),
                       st.integers(-10**4, 10**4).map(lambda n: n / 10)))
def test_any_finite_value_reads_back_exactly_through_the_view(sqlite_db, value):
    seq = next(_seq)
    insert_reports(sqlite_db, [sample("acme", "m", "s", seq, 1.0, cpu_percent=value, memory_percent=value,
                                      disk_percent=value, load1=value)])
    got = sqlite_db.query_one("SELECT cpu_percent, memory_percent, disk_percent, load1 FROM reports WHERE seq = ?",
                              (seq,))
    assert got == (value,) * 4
    assert all(type(v) is float and math.copysign(1, v) == math.copysign(1, value) or v == 0 for v in got)


def test_ids_made_in_a_rolled_back_transaction_are_forgotten(sqlite_db):
    ids = SampleIds()
    sqlite_db.execute("BEGIN")
    ids.add_machines(sqlite_db, [("acme", "gone")])
    made = ids.machines["acme", "gone"]
    sqlite_db.execute("ROLLBACK")
    ids.rollback()
    assert ("acme", "gone") not in ids.machines
    assert made not in ids.inventory
    with sqlite_db.transaction():  # another machine takes the id the rolled-back row had
        SampleIds().add_machines(sqlite_db, [("acme", "other")])
    assert sqlite_db.query("SELECT id FROM report_machines WHERE machine_id = 'other'") == [(made,)]
    with sqlite_db.transaction():
        ids.add_machines(sqlite_db, [("acme", "gone")])
    ids.commit()
    again = ids.machines["acme", "gone"]
    assert sqlite_db.query("SELECT machine_id FROM report_machines WHERE id = ?", (again,)) == [("gone",)]


def test_ids_of_rows_that_exist_are_found_not_made_twice(sqlite_db):
    with sqlite_db.transaction():
        SampleIds().add_machines(sqlite_db, [("acme", f"known-{n}") for n in range(3)])
    ids = SampleIds()
    with sqlite_db.transaction():  # 70 keys: two INSERT statements; three of the keys exist
        ids.add_machines(sqlite_db, [("acme", f"known-{n}") for n in range(70)])
    ids.commit()
    stored = dict(((org, m), i) for i, org, m in sqlite_db.query(
        "SELECT id, org, machine_id FROM report_machines WHERE machine_id LIKE 'known-%'"))
    assert ids.machines == stored
    assert len(stored) == 70
    assert [ids.inventory.get(stored["acme", f"known-{n}"]) for n in range(3)] == [None] * 3  # may have one


def test_remembered_ids_are_bounded(sqlite_db, monkeypatch):
    monkeypatch.setattr(samples, "MAX_REMEMBERED", 3)
    ids = SampleIds()
    for n in range(10):
        with sqlite_db.transaction():
            ids.add_machines(sqlite_db, [("acme", f"bounded-{n}")])
        ids.commit()
    assert 0 < len(ids.machines) <= 4
    with sqlite_db.transaction():  # a forgotten id is found again, not made twice
        ids.add_machines(sqlite_db, [("acme", "bounded-0")])
    assert sqlite_db.query("SELECT id FROM report_machines WHERE machine_id = 'bounded-0'") == [
        (ids.machines["acme", "bounded-0"],)]
