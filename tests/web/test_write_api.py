"""The write API end to end through the real WSGI app and database (both engines): who may do what, the same
validation as the CLI, another org's ids as 404, the CSRF header with a session cookie, and the audit log."""

from __future__ import annotations

import time

import pytest

from fleet.broker.pki import ensure_certs
from fleet.config.tls import ca_fingerprint
from fleet.store import api_tokens, audit, people
from tests.alerts.receiver import Receiver, signed_with
from tests.helpers import bearer

pytestmark = pytest.mark.both_engines
PASSWORD = "correct horse battery"


@pytest.fixture
def crew(fleet):
    """A personal token of a viewer, an operator and an admin of acme, and a globex admin's."""
    tokens = {}
    with fleet.db() as db:
        for role in people.ROLES:
            person = people.add_person(db, f"{role}@acme.test", {"acme": role}, password=PASSWORD)
            tokens[role] = api_tokens.create(db, person, "acme", "t").token
        other = people.add_person(db, "admin@globex.test", {"globex": "admin"})
        tokens["globex"] = api_tokens.create(db, other, "globex", "t").token
    return tokens


def as_(token: str) -> dict[str, str]:
    return bearer(token)


def actions(fleet, org: str = "acme") -> list[tuple[str, str, str]]:
    with fleet.db() as db:
        return [(e["actor"], e["action"], e["target"]) for e in audit.entries(db, org)]


def firing_alert(fleet, org: str, rule: str = "machine-offline", machine: str = "m1", state: str = "firing") -> int:
    now = time.time()
    fleet.insert("alerts", [{"org": org, "rule": rule, "machine_id": machine, "active_at": now - 60, "state": state,
                             "severity": "critical", "summary": "m1 is offline", "value": None,
                             "fired_at": now - 10 if state != "pending" else None,
                             "resolved_at": now if state == "resolved" else None, "notified": 0}])
    with fleet.db() as db:
        return db.query("SELECT max(id) FROM alerts")[0][0]


# Every write endpoint, the least role it needs, and a request it accepts.
WRITES = [
    ("post", "/api/silences", {"org": "acme", "for": "1h"}, "operator"),
    ("post", "/api/rules", {"org": "acme", "name": "hot", "when": "cpu_percent > 90"}, "admin"),
    ("delete", "/api/rules/disk-full", None, "admin"),
    ("post", "/api/channels", {"org": "acme", "name": "ops", "url": "https://hooks.example.com/x"}, "admin"),
    ("get", "/api/channels", None, "admin"),
    ("get", "/api/enrol", None, "admin"),
]


def signed_in(client, email: str):
    """A new client of the same app holding ``email``'s session cookie, and its CSRF header."""
    browser = client.application.test_client()
    answer = browser.post("/api/session", json={"email": email, "password": PASSWORD})
    assert answer.status_code == 200
    return browser, {"X-CSRF-Token": answer.get_json()["csrf_token"]}


@pytest.mark.parametrize(("method", "path", "body", "needs"), WRITES)
def test_each_endpoint_takes_only_the_roles_allowed_it_with_a_session(client, crew, method, path, body, needs):
    ranks = {"viewer": 0, "operator": 1, "admin": 2}
    for role in people.ROLES:
        browser, csrf = signed_in(client, f"{role}@acme.test")
        query = f"{'&' if '?' in path else '?'}org=acme" if method in ("get", "delete") else ""
        answer = getattr(browser, method)(path + query, json=body, headers=csrf)
        assert answer.status_code == (200 if ranks[role] >= ranks[needs] else 403), (role, answer.get_json())


@pytest.mark.parametrize(("method", "path", "body", "needs"), WRITES)
def test_each_endpoint_takes_only_the_roles_allowed_it(client, fleet, crew, method, path, body, needs):
    for key, allowed in ((fleet.acme.reader_key, False), (crew["viewer"], needs == "viewer"),
                         (crew["operator"], needs in ("viewer", "operator"))):
        answer = getattr(client, method)(path, json=body, headers=as_(key))
        assert (answer.status_code == 403) != allowed, (key, answer.get_json())
        assert allowed or "error" in answer.get_json()
    done = getattr(client, method)(path, json=body, headers=as_(crew["admin"]))
    assert done.status_code == 200, done.get_json()


def test_an_operator_silences_from_a_session_with_the_csrf_header(client, fleet, crew):
    signed = client.post("/api/session", json={"email": "operator@acme.test", "password": PASSWORD})
    assert signed.status_code == 200
    csrf = signed.get_json()["csrf_token"]
    body = {"org": "acme", "for": "1h", "machines": "web-*", "rule": "machine-offline", "comment": "deploy"}
    assert client.post("/api/silences", json=body).status_code == 403  # no X-CSRF-Token
    assert client.post("/api/silences", json=body, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    made = client.post("/api/silences", json=body, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 200
    answer = made.get_json()
    assert set(answer) == {"id", "ends_at"}
    assert abs(answer["ends_at"] - (time.time() + 3600)) < 30
    listed = client.get("/api/silences?org=acme").get_json()["data"]
    assert [(s["id"], s["machines"], s["rule"], s["comment"]) for s in listed] == [
        (answer["id"], "web-*", "machine-offline", "deploy")]
    assert client.get("/api/silences", headers=as_(fleet.globex.reader_key)).get_json()["data"] == []
    assert client.delete(f"/api/silences/{answer['id']}?org=acme").status_code == 403
    ended = client.delete(f"/api/silences/{answer['id']}?org=acme", headers={"X-CSRF-Token": csrf})
    assert ended.status_code == 200
    assert ended.get_json() == {"deleted": answer["id"]}
    assert client.get("/api/silences?org=acme").get_json()["data"] == []
    sid = str(answer["id"])
    assert actions(fleet) == [("user:operator@acme.test", "silence.create", sid),
                              ("user:operator@acme.test", "silence.delete", sid)]


def test_a_silence_covers_the_alerts_it_names(client, fleet, crew):
    alert_id = firing_alert(fleet, "acme")
    made = client.post("/api/silences", json={"for": "4h", "machines": "m1"}, headers=as_(crew["operator"]))
    assert made.status_code == 200  # a token's org is implied
    seconds = client.post("/api/silences", json={"for": 600}, headers=as_(crew["operator"])).get_json()
    assert abs(seconds["ends_at"] - (time.time() + 600)) < 30  # a number of seconds will do too
    assert client.get(f"/api/alerts/{alert_id}", headers=as_(crew["viewer"])).get_json()["silenced"] is True


@pytest.mark.parametrize(("path", "body", "problem"), [
    ("/api/silences", {"org": "acme"}, "'for'"),
    ("/api/silences", {"org": "acme", "for": "soon"}, "duration"),
    ("/api/silences", {"org": "acme", "for": "0s"}, "longer than 0s"),
    ("/api/silences", {"org": "acme", "for": [1]}, "'for' must be a duration such as '1h'"),
    ("/api/silences", {"org": "acme", "for": -5}, "longer than 0s"),
    ("/api/silences", {"org": "acme", "for": "1h", "machines": "env=prod,role"}, "invalid selector term 'role'"),
    ("/api/silences", {"org": "acme", "for": "1h", "rule": "nope"}, "no rule named 'nope'"),
    ("/api/rules", {"org": "acme", "name": "r", "when": "cpu_percent >> 9"}, "unknown operator '>>'"),
    ("/api/rules", {"org": "acme", "name": "r", "when": "cpu_percent > 9", "severity": "loud"}, "severity"),
    ("/api/rules", {"org": "acme", "name": "bad name", "when": "conflict"}, "rule"),
    ("/api/rules", {"org": "acme", "name": "disk-full", "when": "conflict"}, "already has a rule named"),
    ("/api/rules", {"org": "acme", "when": "conflict"}, "'name'"),
    ("/api/channels", {"org": "acme", "name": "c", "url": "ftp://x"}, "ftp://"),
    ("/api/channels", {"org": "acme", "name": "c", "url": "mailto:x@example.com", "watchdog": True}, "watchdog"),
    ("/api/enrol", {"org": "acme", "uses": -1}, "--uses"),
    ("/api/enrol", {"org": "acme", "expires": "never"}, "duration"),
    ("/api/enrol", {"org": "acme", "uses": "3"}, "'uses' must be an integer"),
    ("/api/channels", {"org": "acme", "name": "c", "url": "https://x.example.com/", "watchdog": "yes"},
     "'watchdog' must be true or false"),
])
def test_bad_values_are_400_naming_the_problem_and_change_nothing(client, fleet, crew, path, body, problem):
    ensure_certs(fleet.data_dir / "certs")
    answer = client.post(path, json=body, headers=as_(crew["admin"]))
    assert answer.status_code == 400, answer.get_json()
    assert problem in answer.get_json()["error"]
    assert actions(fleet) == []


def test_a_body_that_is_not_a_json_object_is_400(client, crew):
    for data in (b"not json", b"[1, 2]"):
        answer = client.post("/api/silences", data=data, headers={**as_(crew["operator"]),
                                                                  "Content-Type": "application/json"})
        assert answer.status_code == 400
        assert "JSON object" in answer.get_json()["error"]


def test_another_orgs_ids_are_not_found_and_left_alone(client, fleet, crew):
    ensure_certs(fleet.data_dir / "certs")
    theirs = crew["globex"]
    silence = client.post("/api/silences", json={"for": "1h"}, headers=as_(theirs)).get_json()["id"]
    client.post("/api/rules", json={"name": "theirs", "when": "conflict"}, headers=as_(theirs))
    client.post("/api/channels", json={"name": "theirs", "url": "https://h.example.com/"}, headers=as_(theirs))
    token = client.post("/api/enrol", json={}, headers=as_(theirs)).get_json()["id"]
    alert_id = firing_alert(fleet, "globex")
    fleet.machine("globex", "g1")
    with fleet.db() as db:
        db.execute("INSERT INTO machine_certs(org, machine_id, serial, key_sha256, cert, not_after, enrolled_at)"
                   " VALUES ('globex', 'g1', 'ab', 'k', 'pem', 9e9, 1)")
    mine = as_(crew["admin"])
    for method, path in (("delete", f"/api/silences/{silence}"), ("post", f"/api/alerts/{alert_id}/ack"),
                         ("delete", "/api/rules/theirs"), ("delete", "/api/channels/theirs"),
                         ("post", "/api/channels/theirs/test"), ("delete", f"/api/enrol/{token}"),
                         ("post", "/api/fleet/g1/revoke"), ("delete", "/api/fleet/g1")):
        answer = getattr(client, method)(path, headers=mine)
        assert answer.status_code == 404, (path, answer.get_json())
        assert "error" in answer.get_json()
    # Naming the other org is refused too: a token acts in its own org only.
    assert client.post("/api/silences", json={"org": "globex", "for": "1h"}, headers=mine).status_code == 403
    with fleet.db() as db:
        assert db.query("SELECT count(*) FROM alert_silences WHERE org = 'globex' AND ends_at > ?",
                        (time.time(),)) == [(1,)]
        assert db.query("SELECT acked_by FROM alerts WHERE id = ?", (alert_id,)) == [(None,)]
        assert db.query("SELECT revoked FROM machine_certs") == [(0,)]
        assert db.query("SELECT revoked FROM enrol_tokens") == [(0,)]
    assert client.get("/api/fleet/g1", headers=as_(fleet.globex.reader_key)).status_code == 200
    assert actions(fleet) == []


def test_an_operator_acknowledges_a_firing_alert_and_it_keeps_firing(client, fleet, crew):
    alert_id = firing_alert(fleet, "acme")
    acked = client.post(f"/api/alerts/{alert_id}/ack", headers=as_(crew["operator"]))
    assert acked.status_code == 200
    body = acked.get_json()
    assert (body["id"], body["state"], body["acked_by"]) == (alert_id, "firing", "operator@acme.test")
    assert abs(body["acked_at"] - time.time()) < 30
    listed = client.get("/api/alerts?state=firing", headers=as_(fleet.acme.reader_key)).get_json()["data"]
    assert [(a["id"], a["acked_by"], a["acked_at"]) for a in listed] == [(alert_id, body["acked_by"],
                                                                          body["acked_at"])]
    again = client.post(f"/api/alerts/{alert_id}/ack", headers=as_(crew["admin"])).get_json()
    assert (again["acked_by"], again["acked_at"]) == (body["acked_by"], body["acked_at"])  # the first one stands
    assert client.post(f"/api/alerts/{alert_id}/ack", headers=as_(crew["viewer"])).status_code == 403
    assert client.post(f"/api/alerts/{alert_id}/ack", headers=as_(fleet.acme.reader_key)).status_code == 403
    for state in ("pending", "resolved"):
        other = firing_alert(fleet, "acme", rule="disk-full", machine=f"m-{state}", state=state)
        refused = client.post(f"/api/alerts/{other}/ack", headers=as_(crew["operator"]))
        assert refused.status_code == 409
        assert state in refused.get_json()["error"]
    assert client.post("/api/alerts/999999/ack", headers=as_(crew["operator"])).status_code == 404
    unacked = firing_alert(fleet, "acme", rule="machine-stale", machine="m2")
    assert client.get(f"/api/alerts/{unacked}", headers=as_(crew["viewer"])).get_json()["acked_by"] is None
    assert actions(fleet) == [("token:operator@acme.test", "alert.ack", str(alert_id))]


def test_an_admin_adds_lists_and_removes_rules(client, fleet, crew):
    admin = as_(crew["admin"])
    body = {"org": "acme", "name": "hot", "when": "cpu_percent > 90", "for": "5m", "machines": "env=prod",
            "severity": "critical"}
    added = client.post("/api/rules", json=body, headers=admin)
    assert added.get_json() == {"name": "hot", "when": "cpu_percent > 90", "for_s": 300.0, "machines": "env=prod",
                                "severity": "critical"}
    listed = client.get("/api/rules", headers=as_(fleet.acme.reader_key)).get_json()["data"]
    assert added.get_json() in listed
    assert {r["name"] for r in listed} >= {"hot", "machine-offline", "disk-full"}
    defaults = client.post("/api/rules", json={"name": "plain", "when": "status == offline"}, headers=admin)
    assert (defaults.get_json()["for_s"], defaults.get_json()["machines"], defaults.get_json()["severity"]) == (
        0.0, "*", "warning")
    assert client.delete("/api/rules/hot", headers=admin).get_json() == {"deleted": "hot"}
    assert client.delete("/api/rules/hot", headers=admin).status_code == 404
    assert "hot" not in {r["name"] for r in client.get("/api/rules", headers=admin).get_json()["data"]}
    assert actions(fleet) == [("token:admin@acme.test", "rule.create", "hot"),
                              ("token:admin@acme.test", "rule.create", "plain"),
                              ("token:admin@acme.test", "rule.delete", "hot")]


def test_an_admin_adds_tests_and_removes_a_channel_whose_secret_is_shown_once(client, fleet, crew):
    admin = as_(crew["admin"])
    receiver = Receiver()
    try:
        added = client.post("/api/channels", json={"org": "acme", "name": "ops", "url": receiver.url},
                            headers=admin).get_json()
        assert (added["org"], added["channel"], added["kind"]) == ("acme", "ops", "webhook")
        secret = added["secret"]
        assert len(secret) >= 40
        listed = client.get("/api/channels", headers=admin)
        assert secret not in listed.get_data(as_text=True)
        assert [(c["channel"], c["kind"]) for c in listed.get_json()["data"]] == [("ops", "webhook")]
        tested = client.post("/api/channels/ops/test", headers=admin)
        assert tested.get_json() == {"channel": "ops", "delivered": True}
        (post,) = receiver.wait_posts(1)
        assert signed_with(post, secret)
        assert client.get("/api/channels", headers=admin).get_json()["data"][0]["last_delivery"] is not None
    finally:
        receiver.stop()
    client.post("/api/channels", json={"org": "acme", "name": "gone", "url": "http://127.0.0.1:9/hook"},
                headers=admin)
    failed = client.post("/api/channels/gone/test", headers=admin)
    assert failed.status_code == 502
    assert failed.get_json()["delivered"] is False
    assert failed.get_json()["error"]
    assert client.delete("/api/channels/ops", headers=admin).get_json() == {"deleted": "ops"}
    assert client.delete("/api/channels/ops", headers=admin).status_code == 404
    assert [a for _, a, _ in actions(fleet)] == ["channel.create", "channel.test", "channel.create", "channel.test",
                                                 "channel.delete"]
    with fleet.db() as db:
        assert secret not in repr(audit.entries(db, "acme"))


def test_an_admin_makes_an_enrolment_token_with_the_command_to_paste_and_revokes_it(client, fleet, crew):
    paths = ensure_certs(fleet.data_dir / "certs")
    admin = as_(crew["admin"])
    made = client.post("/api/enrol", json={"org": "acme", "uses": 3, "expires": "2h"}, headers=admin).get_json()
    assert set(made) == {"org", "id", "token", "uses", "expires_at", "command"}
    assert made["uses"] == 3
    assert abs(made["expires_at"] - (time.time() + 7200)) < 30
    assert ca_fingerprint(paths.ca.read_bytes()) in made["token"]
    assert made["command"] == f"fleet agent --broker mqtts://127.0.0.1:1 --org acme --enrol {made['token']}"
    listed = client.get("/api/enrol", headers=admin)
    assert made["token"] not in listed.get_data(as_text=True)
    assert [(t["id"], t["uses"], t["revoked"]) for t in listed.get_json()["data"]] == [(made["id"], 3, False)]
    assert client.delete(f"/api/enrol/{made['id']}", headers=admin).get_json() == {"revoked": made["id"]}
    assert client.get("/api/enrol", headers=admin).get_json()["data"][0]["revoked"] is True
    assert client.delete("/api/enrol/0000000000000000", headers=admin).status_code == 404
    assert actions(fleet) == [("token:admin@acme.test", "enrol.create", made["id"]),
                              ("token:admin@acme.test", "enrol.revoke", made["id"])]


def test_an_admin_revokes_a_machines_certificate_and_forgets_a_machine(client, fleet, crew):
    admin = as_(crew["admin"])
    fleet.machine("acme", "m1")
    fleet.machine("acme", "m2")
    fleet.reports("acme", "m2", 3, time.time() - 60)
    with fleet.db() as db:
        db.execute("INSERT INTO machine_certs(org, machine_id, serial, key_sha256, cert, not_after, enrolled_at)"
                   " VALUES ('acme', 'm1', 'ab', 'k', 'pem', 9e9, 1)")
    assert client.post("/api/fleet/m1/revoke", headers=admin).get_json() == {"revoked": "m1"}
    assert client.get("/api/fleet/m1", headers=admin).get_json()["auth"] == "org-key"  # no valid certificate left
    assert client.post("/api/fleet/m2/revoke", headers=admin).status_code == 404  # m2 has no certificate
    assert client.delete("/api/fleet/m2", headers=admin).get_json() == {"deleted": "m2"}
    assert client.get("/api/fleet/m2", headers=admin).status_code == 404
    assert [m["machine_id"] for m in client.get("/api/fleet", headers=admin).get_json()["data"]] == ["m1"]
    history = client.get("/api/fleet/m2/history", headers=admin)
    assert history.status_code == 404  # the machine is gone from the API ...
    with fleet.db() as db:  # ... its history is kept until retention ends
        assert db.query("SELECT count(*) FROM reports WHERE org = 'acme' AND machine_id = 'm2'") == [(3,)]
        assert db.query("SELECT org, machine_id FROM machine_forgets") == [("acme", "m2")]  # for the collector
    assert client.delete("/api/fleet/m2", headers=admin).status_code == 404
    assert actions(fleet) == [("token:admin@acme.test", "machine.revoke", "m1"),
                              ("token:admin@acme.test", "machine.forget", "m2")]
