"""Labels in the API and /metrics over a real database, SQLite and PostgreSQL: merged, filtered, counted."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from fleet.config.labels import labels_json
from fleet.store.labels import set_labels
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines


def _machines(fleet, labels_by_machine: dict[str, dict[str, str]]) -> None:
    for machine_id, labels in labels_by_machine.items():
        fleet.machine("acme", machine_id)
        with fleet.db() as db:
            db.execute("UPDATE machines SET agent_labels = ? WHERE org = ? AND machine_id = ?",
                       (labels_json(labels), "acme", machine_id))


@pytest.fixture
def labelled(fleet):
    _machines(fleet, {"web-1": {"env": "prod", "role": "web"}, "web-2": {"env": "dev", "role": "web"},
                      "db-1": {"env": "prod", "role": "db"}, "bare": {}})
    fleet.machine("globex", "g-1")
    return fleet


def _ids(client, fleet, query: str) -> list[str]:
    res = client.get(f"/api/fleet?{query}", headers=bearer(fleet.acme.reader_key))
    assert res.status_code == 200, res.get_json()
    return [m["machine_id"] for m in res.get_json()["data"]]


def test_machine_objects_carry_labels_and_a_server_label_wins(client, labelled):
    with labelled.db() as db:
        set_labels(db, "acme", "web-2", ["env=staging", "site=par"], [])
    data = {m["machine_id"]: m["labels"] for m in
            client.get("/api/fleet", headers=bearer(labelled.acme.reader_key)).get_json()["data"]}
    assert data == {"bare": {}, "db-1": {"env": "prod", "role": "db"}, "web-1": {"env": "prod", "role": "web"},
                    "web-2": {"env": "staging", "role": "web", "site": "par"}}
    one = client.get("/api/fleet/web-2", headers=bearer(labelled.acme.reader_key)).get_json()
    assert one["labels"] == {"env": "staging", "role": "web", "site": "par"}
    with labelled.db() as db:
        assert set_labels(db, "acme", "web-2", [], ["env"]) == {"env": "dev", "role": "web", "site": "par"}
        reasons = [r[0] for r in db.query("SELECT reason FROM events WHERE machine_id = 'web-2' ORDER BY id")]
    assert reasons == ["labels: env=dev->staging, +site=par", "labels: env=staging->dev"]


def test_a_label_value_holding_json_text_matches_only_itself(client, fleet):
    tricky = 'x"}{"env":"prod'  # no comma: a selector's terms are split on commas
    _machines(fleet, {"trick": {"note": tricky}, "quote": {"env": 'pr"od'}, "utf": {"env": "prod", "city": "Zürich"}})
    assert _ids(client, fleet, "label=env=prod") == ["utf"]
    assert _ids(client, fleet, "label=city=Zürich") == ["utf"]
    assert _ids(client, fleet, f"label=note={tricky}") == ["trick"]
    assert _ids(client, fleet, 'label=env=pr"od') == ["quote"]
    assert _ids(client, fleet, "label=env!=prod") == ["quote", "trick"]


def test_fleet_filters_by_selector(client, labelled):
    assert _ids(client, labelled, "label=env=prod") == ["db-1", "web-1"]
    assert _ids(client, labelled, "label=env=prod&label=role!=db") == ["web-1"]
    assert _ids(client, labelled, "label=role!=db") == ["bare", "web-1", "web-2"]
    assert _ids(client, labelled, "label=env=prod,role=web") == ["web-1"]
    assert _ids(client, labelled, "label=env=nope") == []
    with labelled.db() as db:
        set_labels(db, "acme", "web-2", ["env=prod"], [])
        set_labels(db, "acme", "bare", ["role=db"], [])
    assert _ids(client, labelled, "label=env=prod") == ["db-1", "web-1", "web-2"]
    assert _ids(client, labelled, "label=role!=db") == ["web-1", "web-2"]
    body = client.get("/api/fleet?label=env=prod&limit=1", headers=bearer(labelled.acme.reader_key)).get_json()
    assert body["count"] == 3
    assert len(body["data"]) == 1


@pytest.mark.parametrize(("query", "named"), [("label=Env=prod", "'Env'"), ("label=env", "'env'"),
                                             ("label=env=", "label 'env'"),
                                             ("label=" + ",".join(["a=b"] * 20), "too many")])
def test_bad_selector_is_400_json_naming_it(client, labelled, query, named):
    res = client.get(f"/api/fleet?{query}", headers=bearer(labelled.acme.reader_key))
    assert res.status_code == 400
    assert named in res.get_json()["error"]


def test_label_counts_over_the_orgs_machines(client, labelled):
    res = client.get("/api/labels", headers=bearer(labelled.acme.reader_key))
    assert res.status_code == 200
    assert res.get_json() == {"env": {"dev": 1, "prod": 2}, "role": {"db": 1, "web": 2}}
    with labelled.db() as db:
        set_labels(db, "acme", "web-2", ["env=prod"], [])
    assert client.get("/api/labels", headers=bearer(labelled.acme.reader_key)).get_json() == {
        "env": {"prod": 3}, "role": {"db": 1, "web": 2}}
    assert client.get("/api/labels", headers=bearer(labelled.globex.reader_key)).get_json() == {}
    assert client.get("/api/labels").status_code == 401


def test_metrics_info_series_per_machine(client, labelled, tmp_path):
    text = client.get("/metrics", headers=bearer(labelled.acme.reader_key)).get_data(as_text=True)
    lines = [line for line in text.splitlines() if line.startswith("fleet_machine_labels")]
    assert 'fleet_machine_labels{org="acme",machine_id="web-1",label_env="prod",label_role="web"} 1.0' in lines
    assert 'fleet_machine_labels{org="acme",machine_id="bare"} 1.0' in lines
    assert len(lines) == 4
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: scripts/test installs Debian's prometheus"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_grouped_by_a_label_key_counts_each_group_and_keeps_groups_together(client, labelled):
    labelled.machine("acme", "web-3", status="stale")
    with labelled.db() as db:
        set_labels(db, "acme", "web-3", ["env=dev"], [])
    body = client.get("/api/fleet?group=env&limit=2", headers=bearer(labelled.acme.reader_key)).get_json()
    assert body["groups"] == [
        {"value": "dev", "counts": {"online": 1, "stale": 1, "offline": 0}},
        {"value": "prod", "counts": {"online": 2, "stale": 0, "offline": 0}},
        {"value": None, "counts": {"online": 1, "stale": 0, "offline": 0}}]
    assert [m["machine_id"] for m in body["data"]] == ["web-2", "web-3"]
    assert _ids(client, labelled, "group=env") == ["web-2", "web-3", "db-1", "web-1", "bare"]
    filtered = client.get("/api/fleet?group=role&label=env=prod", headers=bearer(labelled.acme.reader_key)).get_json()
    assert [(g["value"], g["counts"]["online"]) for g in filtered["groups"]] == [("db", 1), ("web", 1)]
    assert "groups" not in client.get("/api/fleet", headers=bearer(labelled.acme.reader_key)).get_json()
    res = client.get("/api/fleet?group=Env", headers=bearer(labelled.acme.reader_key))
    assert res.status_code == 400
    assert "'Env'" in res.get_json()["error"]
