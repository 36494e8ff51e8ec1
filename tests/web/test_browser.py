"""The dashboard in Debian's Chromium (Playwright): sign in, see machines, filter, open a chart, XSS inert."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from playwright.sync_api import expect

from fleet.web.server import start_in_thread
from tests.dbhelpers import insert_reports, sample

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
XSS = "<img src=x onerror=\"window.__pwned=1\">"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def served(settings):
    """The web app on a free port (it reads fleet.db per request, so rows may be added after it starts)."""
    running = start_in_thread(settings.replace(http_port=0))
    yield running
    running.stop()


@pytest.fixture
def site(fleet, served):
    now = time.time()
    fleet.machine("acme", "web-1", "online", "Linux", cpu=35)
    fleet.machine("acme", "db-1", "stale", "Linux", cpu=80, last_seen=now - 45)
    fleet.machine("acme", "win-7", "offline", "Windows", cpu=5, offset=12.5)
    fleet.machine("acme", "evil-1", "online", "Linux", hostname=XSS, conflict=True)
    fleet.machine("globex", "other-org", "online")
    fleet.reports("acme", "web-1", 60, now - 600,
                  system=lambda i: {"os": "Linux", "os_version": "12" if i < 45 else "13"})
    fleet.event("acme", "web-1", now - 300, None, "online")
    fleet.event("acme", "web-1", now - 200, "online", "offline", "lost")
    fleet.event("acme", "web-1", now - 100, "offline", "online")
    return served


@pytest.mark.both_engines  # the API answers alike on both (test_engines_agree.py); one browser run each
def test_dashboard_end_to_end(browser, site, fleet):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(site.url + "/")
    page.fill("#token", fleet.acme.reader_key)
    page.click("#login-form button")
    page.wait_for_selector("#machines tbody tr")
    rows = page.locator("#machines tbody tr")
    assert rows.count() == 4
    assert page.text_content("#count-online") == "2"
    assert page.text_content("#count-offline") == "1"
    assert "other-org" not in page.content()
    # XSS attempt: the hostname shows as text and nothing runs.
    assert page.locator("text=" + XSS).count() >= 1
    assert page.evaluate("window.__pwned === undefined")
    assert not dialogs
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    page.select_option("#os-filter", "Windows")
    expect(rows).to_have_count(1)
    assert page.text_content("#machines tbody tr .name") == "win-7"
    assert "clock" in page.text_content("#machines tbody tr")
    page.select_option("#os-filter", "")
    page.fill("#search", "db")
    expect(rows).to_have_count(1)
    page.fill("#search", "")
    expect(rows).to_have_count(4)

    page.click("tr[data-machine='web-1']")
    page.wait_for_selector("#detail:not([hidden]) .chart[data-chart='cpu'] path.line")
    assert page.locator(".chart").count() == 4
    path = page.get_attribute(".chart[data-chart='cpu'] path.line", "d")
    assert path.count("L") >= 50
    # Three status changes and the inventory: first reported, then upgraded (report 45, 150 s ago).
    timeline = page.locator("#d-events li")
    expect(timeline).to_have_count(5)
    assert "os_version: 12 → 13" in timeline.nth(1).text_content()  # newest first: after the event 100 s ago
    assert "first reported" in timeline.nth(4).text_content()
    page.screenshot(path=str(ARTIFACTS / "detail.png"), full_page=False)

    page.reload()  # the token survives a reload (sessionStorage), the page comes back signed in
    page.wait_for_selector("#machines tbody tr")
    page.click("#logout")
    page.wait_for_selector("#login:not([hidden])")
    page.close()


def test_wrong_token_is_refused_in_the_page(browser, site):
    page = browser.new_page()
    page.goto(site.url + "/")
    page.fill("#token", "wrong")
    page.click("#login-form button")
    expect(page.locator("#login-error")).not_to_be_empty()
    assert page.locator("#fleet").is_hidden()
    page.close()


def test_token_in_the_url_fragment_signs_in_and_is_removed(browser, site, fleet):
    page = browser.new_page()
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.wait_for_selector("#machines tbody tr")
    assert "token" not in page.url
    page.close()


def test_the_detail_view_names_the_disk_its_figure_comes_from(browser, site, fleet):
    """disk_percent is the fullest disk (fleet.config.derived), not the root one: the detail view says which."""
    metrics = {"cpu_percent": 35.0, "disks": [{"mount": "/", "percent": 41.0}, {"mount": "/data", "percent": 93.4},
                                              {"mount": "/boot", "percent": 12.0}]}
    with fleet.db() as db:
        db.execute("UPDATE machines SET metrics = ? WHERE machine_id = 'web-1'", (json.dumps(metrics),))
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.click("tr[data-machine='web-1']")
    disk = page.locator("xpath=//dl[@id='d-facts']/dt[text()='Disk']/following-sibling::dd[1]")
    expect(disk).to_have_text("93% (fullest: /data)")
    expect(page.locator("tr[data-machine='web-1'] td.num").nth(2)).to_contain_text("93%")  # the table's disk bar
    page.close()


@pytest.fixture
def site_with_extras(fleet, served):
    """A machine whose agent reports top processes, two process checks (one at 0) and custom series."""
    now = time.time()
    fleet.machine("acme", "app-1", "online", "Linux", cpu=20)
    metrics = {"cpu_percent": 20.0, "memory": {"percent": 40.0},
               "processes": [{"name": "postgres", "pid": 812, "cpu_percent": 87.5, "memory_percent": 12.25},
                             {"name": XSS, "pid": 813, "cpu_percent": 3.0, "memory_percent": 0.5}],
               "process_counts": {"nginx": 0, "re:gunicorn.*app": 4},
               "custom": {"queue_depth": 12.0, 'queue_depth{queue="mail"}': 3.0}}
    with fleet.db() as db:
        db.execute("UPDATE machines SET metrics = ? WHERE machine_id = 'app-1'", (json.dumps(metrics),))
        insert_reports(db, [sample("acme", "app-1", "s1", i, now - 600 + i * 10, cpu_percent=20.0,
                                   fields={"custom.queue_depth": float(i), "process.nginx": 1 if i < 30 else 0})
                            for i in range(60)])
    return served


def test_the_detail_view_shows_processes_checks_and_custom_series(browser, site_with_extras, fleet):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{site_with_extras.url}/#token={fleet.acme.reader_key}")
    page.click("tr[data-machine='app-1']")
    page.wait_for_selector("#d-processes tbody tr")
    rows = page.locator("#d-processes tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).inner_text().split() == ["postgres", "812", "87.5%", "12.3%"]
    assert page.locator("text=" + XSS).count() >= 1  # a process name is text, never markup
    assert page.evaluate("window.__pwned === undefined")
    down = page.locator("#d-checks li.down")
    assert down.count() == 1
    assert down.get_attribute("data-check") == "nginx"
    assert page.locator("#d-checks li.up").get_attribute("data-check") == "re:gunicorn.*app"
    color = down.locator(".mark").evaluate("e => getComputedStyle(e).color")
    assert color == "rgb(214, 69, 69)"  # --offline: the red mark at 0
    # Custom series are chartable: the first is drawn from history, another can be chosen.
    page.wait_for_selector(".chart[data-chart='custom'] path.line")
    assert page.get_attribute(".chart[data-chart='custom'] path.line", "d").count("L") >= 50
    page.screenshot(path=str(ARTIFACTS / "detail-extras.png"), full_page=True)
    page.select_option("#d-custom-series", 'queue_depth{queue="mail"}')
    expect(page.locator(".chart[data-chart='custom'] h4")).to_contain_text('queue_depth{queue="mail"}')


def signed_in(browser, site, fleet):
    """A page signed in as acme, en-GB in UTC (24-hour times to compare with), with a count of table re-renders."""
    page = browser.new_page(viewport={"width": 1400, "height": 900}, locale="en-GB", timezone_id="UTC")
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.wait_for_selector("#machines tbody tr")
    page.evaluate("""() => { window.__renders = 0;
        new MutationObserver(() => { window.__renders += 1; })
            .observe(document.querySelector('#machines tbody'), { childList: true }); }""")
    return page


def wait_for_refreshes(page, n=2):
    """Wait until the table was rebuilt ``n`` more times by the page's own refresh timer (every second here)."""
    start = page.evaluate("window.__renders")
    page.wait_for_function("n => window.__renders >= n", arg=start + n, timeout=10_000)


@pytest.mark.slow
def test_a_row_opens_from_the_keyboard_and_keeps_focus_across_refreshes(browser, site, fleet):
    page = signed_in(browser, site, fleet)
    for _ in range(40):  # Tab through the page's controls to the first row
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.matches('#machines tbody tr')"):
            break
    else:
        pytest.fail("Tab never reached a table row")
    first = page.evaluate("document.activeElement.dataset.machine")
    page.keyboard.press("Tab")  # on to the next row
    machine = page.evaluate("document.activeElement.dataset.machine")
    assert machine
    assert machine != first
    wait_for_refreshes(page)  # the rows were rebuilt: focus is on the new row of the same machine
    assert page.evaluate("document.activeElement.dataset.machine") == machine
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#d-name")).to_have_text(machine)
    expect(page.locator("#d-name")).to_be_focused()
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    assert page.evaluate("document.activeElement.dataset.machine") == machine
    page.keyboard.press("Space")
    expect(page.locator("#detail")).to_be_visible()
    page.close()


def test_toggle_buttons_say_whether_they_are_pressed(browser, site, fleet):
    page = signed_in(browser, site, fleet)
    stat = {s: page.locator(f".stat[data-status='{s}']") for s in ("online", "stale", "offline")}
    for button in stat.values():
        expect(button).to_have_attribute("aria-pressed", "false")
    stat["online"].click()
    expect(stat["online"]).to_have_attribute("aria-pressed", "true")
    expect(stat["stale"]).to_have_attribute("aria-pressed", "false")
    expect(page.locator("#machines tbody tr")).to_have_count(2)
    stat["online"].click()
    expect(stat["online"]).to_have_attribute("aria-pressed", "false")
    page.select_option("#status-filter", "stale")  # the select and the buttons are one filter
    expect(stat["stale"]).to_have_attribute("aria-pressed", "true")
    expect(stat["online"]).to_have_attribute("aria-pressed", "false")
    page.select_option("#status-filter", "")

    page.click("tr[data-machine='web-1']")
    ranges = page.locator(".range button")
    expect(ranges).to_have_count(4)
    assert [ranges.nth(i).get_attribute("aria-pressed") for i in range(4)] == ["true", "false", "false", "false"]
    page.click(".range button[data-range='3600']")
    expect(page.locator(".range button[data-range='3600']")).to_have_attribute("aria-pressed", "true")
    expect(page.locator(".range button[data-range='900']")).to_have_attribute("aria-pressed", "false")
    page.close()


def axis_ticks(page, chart):
    """(datetime, text, left x) of each time-axis label under ``chart``."""
    return page.eval_on_selector_all(
        f".chart[data-chart='{chart}'] .axis time",
        "els => els.map(e => [e.getAttribute('datetime'), e.textContent, e.getBoundingClientRect().left])")


def steps(ticks):
    """The distinct gaps, in seconds, between consecutive axis labels."""
    stamps = [datetime.fromisoformat(iso).timestamp() for iso, _, _ in ticks]
    return {b - a for a, b in zip(stamps, stamps[1:], strict=False)}


def test_charts_have_a_labelled_time_axis(browser, site, fleet):
    page = signed_in(browser, site, fleet)
    page.click("tr[data-machine='web-1']")
    page.wait_for_selector(".chart[data-chart='cpu'] path.line")
    now = time.time()
    for name in ("cpu", "memory", "disk", "network"):
        ticks = axis_ticks(page, name)
        assert len(ticks) >= 2, name
        stamps = [datetime.fromisoformat(iso).timestamp() for iso, _, _ in ticks]
        # Each label is its tick's time of day (UTC, 24-hour in en-GB), inside the 15-minute window.
        assert [text for _, text, _ in ticks] == [time.strftime("%H:%M", time.gmtime(t)) for t in stamps]
        assert all(now - 900 - 5 <= t <= now + 5 for t in stamps)
        assert steps(ticks) == {300.0}  # round 5-minute steps
        lefts = [left for _, _, left in ticks]
        assert lefts == sorted(lefts)
    # The x axis is the window, not the data: 10 minutes of history start a third of the way in.
    path = page.get_attribute(".chart[data-chart='cpu'] path.line", "d")
    first_x = float(re.match(r"M([\d.]+),", path).group(1))
    assert 0.28 < first_x / 280 < 0.40
    page.click(".range button[data-range='3600']")
    page.wait_for_function("""() => {
        const t = [...document.querySelectorAll(".chart[data-chart='cpu'] .axis time")];
        const at = (i) => Date.parse(t[i].getAttribute("datetime"));
        return t.length >= 2 && at(1) - at(0) > 300000;
    }""")
    assert steps(axis_ticks(page, "cpu")) == {900.0}  # quarter hours over the last hour
    page.close()


def set_metrics(fleet, machine_id, **metrics):
    """Merge ``metrics`` into an acme machine's latest metrics."""
    with fleet.db() as db:
        (current,) = db.query_one("SELECT metrics FROM machines WHERE org = 'acme' AND machine_id = ?", [machine_id])
        db.execute("UPDATE machines SET metrics = ? WHERE org = 'acme' AND machine_id = ?",
                   [json.dumps({**json.loads(current), **metrics}), machine_id])


def test_numbers_in_the_detail_are_formatted(browser, site, fleet):
    set_metrics(fleet, "web-1", load_avg=[1.4849999999999999, 0.30000000000000004, 12], cpu_count=8,
                uptime_s=90061.123456789)
    page = signed_in(browser, site, fleet)
    page.click("tr[data-machine='web-1']")
    page.wait_for_selector(".chart[data-chart='cpu'] path.line")
    facts = dict(zip(page.locator("#d-facts dt").all_text_contents(), page.locator("#d-facts dd").all_text_contents(),
                     strict=True))
    assert facts["Load"] == "1.48, 0.30, 12.00"
    assert facts["CPUs"] == "8"
    assert facts["Uptime"] == "1.0 days"
    assert not re.search(r"\d\.\d{4,}", page.inner_text("#detail"))  # no float printed raw anywhere
    page.close()


@pytest.mark.slow
def test_only_a_small_status_region_is_live(browser, site, fleet):
    page = signed_in(browser, site, fleet)
    assert page.eval_on_selector_all("[aria-live]", "els => els.map(e => e.id)") == ["live-status"]
    assert page.get_attribute("#live-status", "role") == "status"
    page.click("tr[data-machine='web-1']")
    expect(page.locator("#live-status")).to_have_text("web-1: online, details open")
    page.evaluate("""() => { window.__spoken = 0;
        new MutationObserver(() => { window.__spoken += 1; }).observe(document.getElementById('live-status'),
            { childList: true, characterData: true, subtree: true }); }""")
    wait_for_refreshes(page)  # the detail re-rendered twice with nothing new: nothing is read out again
    assert page.evaluate("window.__spoken") == 0
    fleet.machine("acme", "web-1", "offline")
    expect(page.locator("#live-status")).to_have_text("web-1 is now offline")
    assert page.evaluate("window.__spoken") == 1
    # A failing refresh is said once, and so is its recovery.
    page.route("**/api/fleet?*", lambda route: route.fulfill(status=503, json={"error": "down"}))
    expect(page.locator("#live-status")).to_have_text("Refresh failed: down")  # the server's JSON error
    page.unroute("**/api/fleet?*")
    expect(page.locator("#live-status")).to_have_text("Refresh works again")
    page.close()


def test_the_detail_says_how_the_machine_authenticates(browser, site, fleet):
    from fleet.store import identity

    ends = time.time() + 100 * 86_400 + 3600
    with fleet.db() as db:
        identity.store_cert(db, "acme", "web-1", "abc", "k" * 64, "PEM", ends, time.time(), renewal=False)
    page = signed_in(browser, site, fleet)

    def facts_of(machine):
        page.click(f"tr[data-machine='{machine}']")
        expect(page.locator("#d-name")).to_have_text(machine)
        return dict(zip(page.locator("#d-facts dt").all_text_contents(),
                        page.locator("#d-facts dd").all_text_contents(), strict=True))

    facts = facts_of("web-1")
    assert facts["Authenticates with"] == "its own certificate"
    assert facts["Certificate ends"] == f"{time.strftime('%Y-%m-%d', time.gmtime(ends))} (in 100 days)"
    others = [m for m in page.locator("tr[data-machine]").evaluate_all("rs => rs.map(r => r.dataset.machine)")
              if m != "web-1"]
    facts = facts_of(others[0])
    assert facts["Authenticates with"] == "the org agent key"
    assert "Certificate ends" not in facts
    page.close()
