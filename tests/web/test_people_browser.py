"""People in the dashboard (Debian's Chromium via Playwright): signing in with email and password, who is signed
in and their role, the org picker, signing out; each action offered only to the roles allowed it; the alerts
panel on a phone; and the incident path against the real stack (broker, collector, webhook receiver, web app)."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import Page, expect

from fleet.broker.pki import ensure_certs
from fleet.config.rules import Rule
from fleet.config.settings import Settings
from fleet.notify.channels import add_channel
from fleet.store import people
from fleet.store.database import open_database
from fleet.web.server import start_in_thread
from tests import stores
from tests.alerts.receiver import Receiver
from tests.collector.collector_fixtures import SimAgent, embedded_endpoint
from tests.collector.conftest import collectors  # noqa: F401 - the running collectors fixture
from tests.dbhelpers import rows
from tests.helpers import wait_for
from tests.oidc.conftest import sign_on
from tests.web.test_alerts_api import _alert
from tests.web.test_browser import ARTIFACTS, browser  # noqa: F401 - the shared Chromium fixture

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PASSWORD = "correct horse battery"
PHONE = {"width": 390, "height": 844}


def add_person(fleet, email: str, roles: dict[str, str]) -> str:
    """A person with these roles (org -> role) and PASSWORD, as ``fleet user add --password-stdin`` makes one."""
    with fleet.db() as db:
        people.add_person(db, email, roles, PASSWORD)
    return email


def sign_in(browser, url: str, email: str, viewport: dict | None = None) -> Page:  # noqa: F811
    """A new page signed in as ``email`` through the sign-in form, its machines on the page."""
    page = browser.new_page(viewport=viewport or {"width": 1400, "height": 900})
    page.goto(url + "/")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#machines tbody tr", timeout=15_000)
    return page


@pytest.fixture
def site(fleet, settings):
    """acme with three machines and two firing alerts (long summaries, as the collector writes them); globex with
    one; the web app on a free port."""
    now = time.time()
    for machine in ("web-1", "web-2", "db-1"):
        fleet.machine("acme", machine, "offline" if machine == "web-1" else "online")
    fleet.machine("globex", "g-1", "online")
    _alert(fleet, "acme", "machine-offline", "web-1", "firing", "critical", fired_at=now - 120)
    _alert(fleet, "acme", "disk-full", "web-1", "firing", "warning", value=95.0, fired_at=now - 60)
    with fleet.db() as db:
        db.execute("UPDATE alerts SET summary = 'disk_percent is 95 on web-1 (disk_percent > 90 for 10m)'"
                   " WHERE rule = 'disk-full'")
        db.execute("UPDATE alerts SET summary = 'web-1 is offline (status == offline for 2m)'"
                   " WHERE rule = 'machine-offline'")
    running = start_in_thread(settings.replace(http_port=0))
    yield running
    running.stop()


def action_buttons(page: Page) -> list[str]:
    """The data-action of every visible action control on the page."""
    return page.locator("[data-action]:visible").evaluate_all("els => els.map(e => e.dataset.action)")


def test_sign_in_shows_who_and_their_role_and_sign_out_ends_the_session(browser, site, fleet):  # noqa: F811
    add_person(fleet, "Ana@Example.com", {"acme": "operator"})
    page = browser.new_page()
    page.goto(site.url + "/")
    expect(page.locator("#sso")).to_be_hidden()  # no OpenID provider configured: no SSO button
    page.fill("#email", "ana@example.com")
    page.fill("#password", "wrong password")
    page.click("#password-form button[type=submit]")
    expect(page.locator("#login-error")).to_have_text("wrong email or password")  # the server's own message
    page.fill("#password", PASSWORD)
    page.click("#password-form button[type=submit]")
    page.wait_for_selector("#machines tbody tr")
    expect(page.locator("#who-name")).to_have_text("ana@example.com")
    expect(page.locator("#who-role")).to_have_text("operator")
    expect(page.locator("#org-name")).to_have_text("acme")
    expect(page.locator("#org-picker")).to_be_hidden()  # one org: nothing to pick
    assert "g-1" not in page.content()
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["fleet_session"]["httpOnly"]
    assert page.evaluate("document.cookie") == ""  # the script never sees the session
    assert page.evaluate("sessionStorage.length") == 0  # nor is any secret kept in the tab

    page.reload()  # the session survives a reload: the page asks GET /api/session who is signed in
    page.wait_for_selector("#machines tbody tr")
    expect(page.locator("#who-name")).to_have_text("ana@example.com")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    page.reload()
    page.wait_for_selector("#login:not([hidden])")  # signed out on the server too
    status = page.evaluate("fetch('/api/fleet?org=acme').then(r => r.status)")
    assert status == 401
    page.close()


def test_a_person_in_two_orgs_picks_one_and_their_role_follows(browser, site, fleet):  # noqa: F811
    add_person(fleet, "bo@example.com", {"acme": "viewer", "globex": "admin"})
    page = sign_in(browser, site.url, "bo@example.com")
    picker = page.locator("#org-picker")
    expect(picker).to_be_visible()
    assert picker.input_value() == "acme"  # the first by name
    expect(page.locator("#who-role")).to_have_text("viewer")
    expect(page.locator("#views [data-view='audit']")).to_be_hidden()
    picker.select_option("globex")
    expect(page.locator("#machines tbody tr")).to_have_count(1)
    expect(page.locator("tr[data-machine='g-1']")).to_be_visible()
    expect(page.locator("#who-role")).to_have_text("admin")
    expect(page.locator("#views [data-view='audit']")).to_be_visible()
    page.reload()  # the choice is kept
    page.wait_for_selector("tr[data-machine='g-1']")
    page.close()


def test_a_viewer_is_offered_no_action(browser, site, fleet):  # noqa: F811
    add_person(fleet, "vi@example.com", {"acme": "viewer"})
    page = sign_in(browser, site.url, "vi@example.com")
    expect(page.locator("#alert-list li[data-alert]")).to_have_count(2)
    page.click("tr[data-machine='web-1']")
    expect(page.locator("#d-alerts li[data-alert]")).to_have_count(2)
    assert action_buttons(page) == []
    views = page.locator("#views [data-view]:visible").evaluate_all("els => els.map(e => e.dataset.view)")
    assert views == ["fleet", "tokens"]  # no panel beyond the fleet but their own API tokens
    page.click("#alerts-panel [data-tab='silences']")
    assert action_buttons(page) == []
    page.close()

    page = browser.new_page()  # a reader key is a viewer too
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.wait_for_selector("#alert-list li[data-alert]")
    expect(page.locator("#who-role")).to_have_text("viewer")
    assert action_buttons(page) == []
    page.close()


def test_an_operator_is_offered_silence_and_acknowledge_but_no_admin_panel(browser, site, fleet):  # noqa: F811
    add_person(fleet, "op@example.com", {"acme": "operator"})
    page = sign_in(browser, site.url, "op@example.com")
    row = page.locator("#alert-list li[data-alert]").first
    expect(row.locator("[data-action='silence']")).to_be_visible()
    expect(row.locator("[data-action='ack']")).to_be_visible()
    page.click("tr[data-machine='web-1']")
    expect(page.locator("#d-actions [data-action='silence-machine']")).to_be_visible()
    assert page.locator("#d-actions [data-action='forget']").count() == 0
    for view in ("rules", "channels", "enrol", "people", "audit"):
        expect(page.locator(f"#views [data-view='{view}']")).to_be_hidden()
    page.close()


def test_a_role_changed_while_signed_in_changes_the_page(browser, site, fleet):  # noqa: F811
    """fleet user grant/revoke/remove apply to a signed-in page: the role shown, the actions offered, the org."""
    add_person(fleet, "op@example.com", {"acme": "operator", "globex": "viewer"})
    page = sign_in(browser, site.url, "op@example.com")
    expect(page.locator("#alert-list [data-action='silence']")).to_have_count(2)
    with fleet.db() as db:
        people.grant(db, "op@example.com", "acme", "viewer")
    expect(page.locator("#who-role")).to_have_text("viewer", timeout=10_000)
    expect(page.locator("#alert-list [data-action]")).to_have_count(0)
    with fleet.db() as db:
        people.revoke(db, "op@example.com", "acme")
    expect(page.locator("tr[data-machine='g-1']")).to_be_visible(timeout=10_000)  # the org left: globex
    expect(page.locator("#org-picker")).to_be_hidden()
    with fleet.db() as db:
        people.remove_person(db, "op@example.com")
    expect(page.locator("#login")).to_be_visible(timeout=10_000)
    expect(page.locator("#login-error")).to_have_text("Your session has ended: sign in again.")
    page.close()


def test_a_person_makes_an_api_token_sees_it_once_and_deletes_it(browser, site, fleet):  # noqa: F811
    add_person(fleet, "vi@example.com", {"acme": "viewer"})
    page = sign_in(browser, site.url, "vi@example.com")
    page.click("#views [data-view='tokens']")
    page.fill("#token-form [name='name']", "grafana")
    page.click("#token-form button[type=submit]")
    token = page.locator("#token-value")
    expect(token).to_contain_text("fleet_pt_")
    expect(page.locator("#tokens-table tbody tr[data-row]")).to_contain_text("grafana")
    status = page.evaluate("t => fetch('/api/fleet', { headers: { Authorization: 'Bearer ' + t } })"
                           ".then(r => r.status)", token.text_content())
    assert status == 200  # it acts as the person, a viewer of acme
    page.click("#views [data-view='fleet']")
    page.click("#views [data-view='tokens']")
    expect(page.locator("#token-once")).to_be_hidden()  # shown once: gone with its panel
    assert "fleet_pt_" not in page.content()
    page.locator("#tokens-table [data-action='delete']").click()
    page.click("#confirm-ok")
    expect(page.locator("#tokens-table tbody tr[data-row]")).to_have_count(0)
    page.close()


def test_the_alerts_panel_on_a_phone_has_no_tall_empty_block(browser, site, fleet):  # noqa: F811
    """At 390x844 an alert's summary used to shrink to a sliver beside its head and wrap a word a line: a block
    hundreds of pixels tall and nearly empty. Now each part is a whole line."""
    add_person(fleet, "op@example.com", {"acme": "operator"})
    page = sign_in(browser, site.url, "op@example.com", viewport=PHONE)
    expect(page.locator("#alert-list li[data-alert]")).to_have_count(2)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "alerts-phone.png"), full_page=True)
    boxes = page.evaluate("""() => [...document.querySelectorAll('#alerts-panel *, .summary > *')]
        .filter(e => e.offsetParent !== null)
        .map(e => { const r = e.getBoundingClientRect();
                    return {what: e.tagName + '.' + e.className, w: r.width, h: r.height, right: r.right}; })""")
    narrow_and_tall = [b for b in boxes if b["h"] > 48 and b["w"] < 120]
    assert narrow_and_tall == [], narrow_and_tall
    assert all(b["right"] <= PHONE["width"] for b in boxes), "something sticks out to the right"
    items = page.evaluate("""() => [...document.querySelectorAll('#alert-list li[data-alert]')].map(li => ({
        h: li.getBoundingClientRect().height, w: li.getBoundingClientRect().width,
        summary: li.querySelector('.what').getBoundingClientRect().width }))""")  # one look: refreshes rebuild it
    assert len(items) == 2
    for item in items:
        assert item["h"] <= 130, item  # head, summary and actions: three short lines at most
        assert item["summary"] >= 0.8 * item["w"], item  # the summary has the row's width, not a sliver
    # The panel is as tall as what it shows: tabs and alerts, no empty space below them.
    gap = page.evaluate("""() => { const p = document.getElementById('alerts-panel').getBoundingClientRect();
        const l = document.getElementById('alert-list').getBoundingClientRect(); return p.bottom - l.bottom; }""")
    assert gap <= 24
    # The summary cards fill their rows: the alerts card is not left alone beside an empty cell.
    card, grid = page.locator("#alerts-card").bounding_box(), page.locator(".summary").bounding_box()
    assert abs((card["x"] + card["width"]) - (grid["x"] + grid["width"])) <= 1
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.close()


def test_every_panel_fits_a_phone(browser, site, fleet):  # noqa: F811
    """Wide tables scroll inside their panel; the page itself never scrolls sideways at 390 px."""
    add_person(fleet, "ad@example.com", {"acme": "admin"})
    page = sign_in(browser, site.url, "ad@example.com", viewport=PHONE)
    for view in ("fleet", "rules", "channels", "enrol", "people", "audit", "tokens"):
        page.click(f"#views [data-view='{view}']")
        if view != "fleet":
            expect(page.locator(f"#view-{view} tbody tr")).not_to_have_count(0)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], view
    page.close()


def focus_by_tab(page: Page, selector: str, most: int = 80) -> None:
    """Press Tab until the focused element matches ``selector`` (a keyboard user's way there)."""
    for _ in range(most):
        page.keyboard.press("Tab")
        if page.evaluate("s => document.activeElement.matches(s)", selector):
            return
    pytest.fail(f"Tab never reached {selector}")


def wait_for_rebuild(page: Page, selector: str) -> None:
    """Wait until the page's refresh rebuilds the children of ``selector`` (it does every second here)."""
    page.evaluate("""s => { window.__rebuilt = false;
        new MutationObserver(() => { window.__rebuilt = true; })
            .observe(document.querySelector(s), { childList: true }); }""", selector)
    page.wait_for_function("() => window.__rebuilt", timeout=10_000)


def silences(fleet) -> list[tuple]:
    with fleet.db() as db:
        return [tuple(r) for r in db.query("SELECT machines, rule, ends_at - starts_at FROM alert_silences"
                                            " WHERE org = 'acme' AND ends_at > ?", [time.time()])]


def test_an_operator_silences_and_acknowledges_with_the_keyboard_only(browser, site, fleet):  # noqa: F811
    add_person(fleet, "op@example.com", {"acme": "operator"})
    page = sign_in(browser, site.url, "op@example.com")
    disk = "#alert-list li[data-rule='disk-full']"
    focus_by_tab(page, f"{disk} [data-action='silence']")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # where the keyboard is shows
    page.keyboard.press("Enter")
    dialog = page.locator("#silence-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#silence-what")).to_have_text("disk-full on web-1")
    wait_for_rebuild(page, "#alert-list")  # the list behind the dialog is rebuilt by the refresh meanwhile
    page.keyboard.press("Escape")  # Escape closes the dialog; nothing is silenced, focus is back on the button
    expect(dialog).to_be_hidden()
    page.wait_for_function(f"() => document.activeElement.matches(\"{disk} [data-action='silence']\")")
    assert silences(fleet) == []

    page.keyboard.press("Enter")
    expect(page.locator("#silence-dialog [data-for='1h']")).to_be_focused()
    wait_for_rebuild(page, "#alert-list")
    page.keyboard.press("Shift+Tab")  # back to the comment
    page.keyboard.type("replacing the disk")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")  # 1 h
    expect(dialog).to_be_hidden()
    expect(page.locator(f"{disk} .sev.silenced")).to_be_visible()
    assert silences(fleet) == [("web-1", "disk-full", 3600.0)]
    expect(page.locator("#live-status")).to_have_text("Silenced disk-full on web-1 for 1 h")
    # The Silence button is gone from that alert: the keyboard is on its row, not lost on the page.
    page.wait_for_function(f"() => document.activeElement.matches(\"{disk}\")")

    focus_by_tab(page, "#alert-list li[data-alert] [data-action='ack']")
    page.keyboard.press("Enter")
    expect(page.locator("#alert-list [data-acked]")).to_have_text("acknowledged by op@example.com")
    assert page.locator("#alert-list [data-action='ack']").count() == 1  # the other alert's, still unacknowledged
    page.click("#alerts-panel [data-tab='silences']")
    silence = page.locator("#alert-list li[data-silence]")
    expect(silence).to_contain_text("replacing the disk")
    silence.locator("[data-action='unsilence']").click()
    expect(page.locator("#alert-list li[data-silence]")).to_have_count(0)
    page.close()


def test_an_operator_silences_a_machine_from_its_detail(browser, site, fleet):  # noqa: F811
    add_person(fleet, "op@example.com", {"acme": "operator"})
    page = sign_in(browser, site.url, "op@example.com", viewport=PHONE)
    page.click("tr[data-machine='db-1']")
    page.click("#d-actions [data-action='silence-machine']")
    expect(page.locator("#silence-what")).to_have_text("every alert of db-1")
    page.click("#silence-dialog [data-for='4h']")
    expect(page.locator("#silence-dialog")).to_be_hidden()
    assert silences(fleet) == [("db-1", None, 4 * 3600.0)]
    expect(page.locator("#tab-silences")).to_have_text("1")
    page.close()


def test_a_refused_change_shows_the_servers_message(browser, site, fleet):  # noqa: F811
    add_person(fleet, "op@example.com", {"acme": "operator"})
    page = sign_in(browser, site.url, "op@example.com")
    with fleet.db() as db:  # the operator is made a viewer while the page is open
        people.grant(db, "op@example.com", "acme", "viewer")
    page.locator("#alert-list [data-action='ack']").first.click()
    expect(page.locator("#notice")).to_have_text("this needs the operator role in org 'acme'; you are viewer")
    page.close()


@pytest.fixture
def receiver():
    """A webhook endpoint on loopback that records what it is sent."""
    made = Receiver()
    yield made
    made.close()


def test_an_admin_manages_rules_channels_enrolment_and_reads_the_audit_log(browser, site, fleet, receiver):  # noqa: F811
    ensure_certs(fleet.data_dir / "certs", ["127.0.0.1"])  # enrolment tokens carry the CA's fingerprint
    add_person(fleet, "ad@example.com", {"acme": "admin"})
    add_person(fleet, "vi@example.com", {"acme": "viewer"})
    page = sign_in(browser, site.url, "ad@example.com")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])

    page.click("#views [data-view='enrol']")
    page.fill("#enrol-form [name='uses']", "3")
    page.click("#enrol-form button[type=submit]")
    command = page.locator("#enrol-command")
    expect(command).to_contain_text("fleet agent --broker")
    text = command.text_content()
    assert "--org acme" in text
    assert "--enrol " in text
    expect(page.locator("#enrol-table tbody tr[data-row]")).to_have_count(1)
    page.click("#enrol-once button.copy")
    expect(page.locator("#enrol-once button.copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == text
    page.click("#enrol-table [data-action='revoke']")
    expect(page.locator("#enrol-table tbody tr[data-row]")).to_contain_text("revoked")

    page.click("#views [data-view='rules']")
    page.fill("#rule-form [name='name']", "cpu-hot")
    page.fill("#rule-form [name='when']", "cpu_percent >>> 90")
    page.click("#rule-form button[type=submit]")
    expect(page.locator("#rules-error")).to_have_text("unknown operator '>>>': use >, >=, < or <=")  # the server's
    page.fill("#rule-form [name='when']", "cpu_percent > 90")
    page.fill("#rule-form [name='for']", "5m")
    page.click("#rule-form button[type=submit]")
    expect(page.locator("#rules-table tr[data-row='cpu-hot']")).to_contain_text("5m")
    expect(page.locator("#rules-error")).to_be_empty()

    page.click("#views [data-view='channels']")
    page.fill("#channel-form [name='name']", "ops-hook")
    page.fill("#channel-form [name='url']", receiver.url)
    page.click("#channel-form button[type=submit]")
    expect(page.locator("#channel-secret-value")).not_to_be_empty()  # the signing secret, shown once
    secret = page.locator("#channel-secret-value").text_content()
    row = page.locator("#channels-table tr[data-row='ops-hook']")
    row.locator("[data-action='test']").click()
    expect(row.locator(".status")).to_have_text("test sent")
    assert len(receiver.wait_posts(1)) == 1

    page.click("#views [data-view='people']")
    expect(page.locator("#people-table tbody tr[data-row]")).to_have_count(2)
    expect(page.locator("#people-table tr[data-row='vi@example.com']")).to_contain_text("viewer")
    page.fill("#person-form [name='email']", "New@Example.com")
    page.select_option("#person-form [name='role']", "operator")
    page.click("#person-form button[type=submit]")
    expect(page.locator("#person-link")).to_contain_text("/invite/")  # the sign-in link to send them
    expect(page.locator("#people-table tr[data-row='new@example.com']")).to_contain_text("invited: no password yet")
    page.fill("#person-form [name='email']", "vi@example.com")
    page.select_option("#person-form [name='role']", "operator")
    page.click("#person-form button[type=submit]")
    expect(page.locator("#people-table tr[data-row='vi@example.com']")).to_contain_text("operator")
    expect(page.locator("#person-once")).to_be_hidden()  # an existing person needs no link
    page.locator("#people-table tr[data-row='new@example.com'] [data-action='remove']").click()
    page.click("#confirm-ok")
    expect(page.locator("#people-table tr[data-row='new@example.com']")).to_have_count(0)
    assert page.locator("#people-table tr[data-row='ad@example.com'] [data-action='remove']").count() == 0

    page.click("#views [data-view='audit']")
    actions = page.locator("#audit-table tbody td code")
    expect(actions.first).to_be_visible()
    done = set(actions.all_text_contents())
    assert {"enrol.create", "enrol.revoke", "rule.create", "channel.create", "channel.test", "user.add",
            "user.grant", "user.revoke"} <= done
    assert "user:ad@example.com" in page.text_content("#audit-table")
    assert secret not in page.content()  # gone with its panel, and never in the audit log
    page.close()


def test_a_person_invited_from_the_people_panel_follows_the_link_and_lands_signed_in(browser, site, fleet):  # noqa: F811
    add_person(fleet, "ad@example.com", {"acme": "admin"})
    page = sign_in(browser, site.url, "ad@example.com")
    page.click("#views [data-view='people']")
    page.fill("#person-form [name='email']", "new@example.com")
    page.select_option("#person-form [name='role']", "operator")
    page.click("#person-form button[type=submit]")
    link = page.locator("#person-link")
    expect(link).to_contain_text("/invite/")
    path = "/invite/" + link.text_content().split("/invite/", 1)[1]
    page.close()

    context = browser.new_context()  # the invited person's own browser: no cookie of the admin's
    newcomer = context.new_page()
    newcomer.goto(site.url + path)
    newcomer.fill("#password", PASSWORD)
    newcomer.fill("#confirm", PASSWORD)
    newcomer.locator("button[type=submit]").click()
    newcomer.wait_for_selector("#machines tbody tr")
    expect(newcomer.locator("#who-name")).to_have_text("new@example.com")
    expect(newcomer.locator("#who-role")).to_have_text("operator")
    expect(newcomer.locator("#alert-list [data-action='silence']").first).to_be_visible()
    context.close()


def test_an_admin_forgets_a_machine_from_its_detail(browser, site, fleet):  # noqa: F811
    add_person(fleet, "ad@example.com", {"acme": "admin"})
    page = sign_in(browser, site.url, "ad@example.com")
    page.click("tr[data-machine='db-1']")
    page.click("#d-actions [data-action='forget']")
    expect(page.locator("#confirm-title")).to_have_text("Forget db-1?")
    page.keyboard.press("Escape")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    expect(page.locator("tr[data-machine='db-1']")).to_be_visible()
    page.click("#d-actions [data-action='forget']")
    page.click("#confirm-ok")
    expect(page.locator("tr[data-machine='db-1']")).to_have_count(0)
    expect(page.locator("#detail")).to_be_hidden()
    page.close()


# --- the incident path, on the real stack --------------------------------------------------------------------

GROUP_WAIT = 0.5
SILENCE_APPLIES_S = 5.0  # SPEC: alert changes (silences included) apply within 5 s without a restart


def alert_states(database: str) -> list[tuple]:
    """(machine, state) of rule ``down``'s alerts in acme."""
    found = rows(database, "SELECT machine_id, state FROM alerts WHERE org = 'acme' AND rule = 'down'")
    return [tuple(r) for r in found]


def value(database: str, sql: str):
    """The one value a query answers (None when it answers no row)."""
    found = rows(database, sql)
    return found[0][0] if found else None


def test_incident_path_an_operator_silences_a_firing_alert_and_its_channel_hears_nothing_more(
        browser, broker, acme, collectors, receiver):  # noqa: F811
    """An agent vanishes; its alert fires and the webhook hears it. An operator signs in with email and password,
    sees the alert and silences it for 1 h from its row; the silence shows. The machine comes back: the alert
    resolves, and the channel gets no notification of it."""
    database = broker.settings.database_url
    settings = Settings(data_dir=broker.data_dir, database_url=database, broker_url=broker.url, ca=str(broker.ca_path),
                        batch_interval_s=0.05, reload_interval_s=0.5, interval=1.0, alert_group_wait=GROUP_WAIT,
                        refresh_interval_ms=1000, http_port=0)
    stores.add_rule(settings.data_dir, Rule.parse("acme", "down", "status == offline", "0s", severity="critical"),
                    database)
    add_channel(settings, "acme", "ops-hook", receiver.url)
    with open_database(database) as db:
        people.add_person(db, "op@example.com", {"acme": "operator"}, PASSWORD)
    collectors(settings)
    web = start_in_thread(settings)
    ep = embedded_endpoint(broker, acme)
    agent = SimAgent(ep, "m1").connect()
    try:
        agent.ping("online")
        wait_for(lambda: value(database, "SELECT status FROM machines WHERE machine_id = 'm1'") == "online",
                 message="m1 online")
        agent.drop()  # gone without a word: its last will says offline
        fired = receiver.wait_posts(1, timeout=30)
        assert [(a["status"], a["labels"]["alertname"]) for a in fired[0].json()["alerts"]] == [("firing", "down")]

        page = sign_in(browser, web.url, "op@example.com")
        row = page.locator("#alert-list li[data-rule='down'][data-machine='m1']")
        expect(row).to_be_visible()
        expect(page.locator("#count-firing")).to_have_text("1")
        row.locator("[data-action='silence']").click()
        page.click("#silence-dialog [data-for='1h']")
        expect(row.locator(".sev.silenced")).to_be_visible()  # the silence shows on the alert
        silenced_at = time.time()
        page.click("#alerts-panel [data-tab='silences']")
        expect(page.locator("#alert-list li[data-silence]")).to_contain_text("m1")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "incident-silenced.png"), full_page=True)

        # The collector reads silences again within the SPEC's 5 s; by then the machine comes back and resolves.
        wait_for(lambda: time.time() >= silenced_at + SILENCE_APPLIES_S, timeout=SILENCE_APPLIES_S + 1)
        back = SimAgent(ep, "m1", session="back-" + agent.session).connect()
        try:
            back.ping("online")
            wait_for(lambda: alert_states(database) == [("m1", "resolved")], timeout=20, message="resolved")
            resolved_at = value(database, "SELECT resolved_at FROM alerts WHERE rule = 'down'")
            # A resolution notice would leave after the group wait: wait past it, and the channel heard nothing.
            wait_for(lambda: time.time() >= resolved_at + GROUP_WAIT + 2.0, timeout=10)
            assert receiver.attempts == 1
            assert value(database, "SELECT count(*) FROM alert_outbox") == 0
        finally:
            back.close()
        page.click("#alerts-panel [data-tab='resolved']")
        expect(page.locator("#alert-list li[data-rule='down']")).to_be_visible()
        page.close()
    finally:
        web.stop()



def test_single_sign_on_through_a_real_provider_lands_signed_in(browser, tmp_path):  # noqa: F811
    """"Sign in with SSO" shows when the server has a provider; through the provider's own sign-in and consent
    pages the browser comes back to the dashboard, which asks GET /api/session who it is."""
    with sign_on(tmp_path / "fleet-data") as sso:
        page = browser.new_page()
        page.goto(sso.web.url + "/")
        sso_link = page.locator("#sso-link")
        expect(sso_link).to_be_visible()
        sso_link.click()
        page.wait_for_url(sso.provider.issuer + "/**")
        page.fill("input[name='login']", "alice")
        page.fill("input[name='password']", "any password")  # the provider's development sign-in takes any
        page.locator("button[type=submit]").first.click()
        page.locator("button[type=submit]").first.click()  # its consent page: continue
        page.wait_for_url(sso.web.url + "/")
        expect(page.locator("#who-name")).to_have_text("alice@example.com")
        expect(page.locator("#who-role")).to_have_text("operator")
        expect(page.locator("#fleet")).to_be_visible()
        page.click("#logout")
        page.wait_for_selector("#login:not([hidden])")
        page.close()
