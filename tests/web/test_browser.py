"""The dashboard in Debian's Chromium (Playwright): sign in, see machines, filter, open a chart, XSS inert."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from fleet.web.server import start_in_thread

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
    fleet.reports("acme", "web-1", 60, now - 600)
    fleet.event("acme", "web-1", now - 300, None, "online")
    fleet.event("acme", "web-1", now - 200, "online", "offline", "lost")
    fleet.event("acme", "web-1", now - 100, "offline", "online")
    return served


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
    assert page.locator("#d-events li").count() == 3
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


@pytest.fixture
def site_with_extras(fleet, served):
    """A machine whose agent reports top processes, two process checks (one at 0) and custom series."""
    import json

    now = time.time()
    fleet.machine("acme", "app-1", "online", "Linux", cpu=20)
    metrics = {"cpu_percent": 20.0, "memory": {"percent": 40.0},
               "processes": [{"name": "postgres", "pid": 812, "cpu_percent": 87.5, "memory_percent": 12.25},
                             {"name": XSS, "pid": 813, "cpu_percent": 3.0, "memory_percent": 0.5}],
               "process_counts": {"nginx": 0, "re:gunicorn.*app": 4},
               "custom": {"queue_depth": 12.0, 'queue_depth{queue="mail"}': 3.0}}
    db = fleet.db()
    db.conn.execute("UPDATE machines SET metrics = ? WHERE machine_id = 'app-1'", (json.dumps(metrics),))
    db["reports"].insert_all([
        {"org": "acme", "machine_id": "app-1", "session": "s1", "seq": i, "ts": now - 600 + i * 10,
         "received": now - 600 + i * 10, "cpu_percent": 20.0, "payload": "{}",
         "fields": json.dumps({"custom.queue_depth": float(i), "process.nginx": 1 if i < 30 else 0})}
        for i in range(60)])
    db.conn.commit()
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
    page.close()
