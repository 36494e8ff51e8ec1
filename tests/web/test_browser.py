"""The dashboard in Debian's Chromium (Playwright): sign in, see machines, filter, open a chart, XSS inert."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from fleet.web.server import start_in_thread

pytestmark = [pytest.mark.browser, pytest.mark.both_engines]
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
def site(fleet, settings):
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
    running = start_in_thread(settings.replace(http_port=0))
    yield running
    running.stop()


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
