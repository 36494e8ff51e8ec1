"""The dashboard's alerts in Chromium (Playwright): the summary card, a badge on the machine's row, the alerts panel
with firing, recently resolved and silences, and the machine's own alerts in its detail."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect

from fleet.web.server import start_in_thread
from tests import stores
from tests.web.test_alerts_api import _alert
from tests.web.test_browser import ARTIFACTS, browser  # noqa: F401 - the shared Chromium fixture

pytestmark = pytest.mark.browser
XSS = "<img src=x onerror=\"window.__pwned=1\">"


@pytest.fixture
def site(fleet, settings):
    now = time.time()
    for machine in ("web-1", "web-2", "db-1"):
        fleet.machine("acme", machine, "offline" if machine == "web-1" else "online")
    fleet.machine("globex", "g-1", "offline")
    _alert(fleet, "acme", "machine-offline", "web-1", "firing", "critical", fired_at=now - 120)
    _alert(fleet, "acme", "disk-full", "web-1", "firing", "warning", value=95.0, fired_at=now - 60)
    _alert(fleet, "acme", "disk-full", "db-1", "resolved", value=91.0, fired_at=now - 900, resolved_at=now - 300)
    _alert(fleet, "globex", "machine-offline", "g-1", "firing", "critical", fired_at=now - 10)
    with fleet.db() as db:
        db.execute("UPDATE alerts SET summary = ? WHERE machine_id = 'web-1' AND rule = 'disk-full'", (XSS,))
    stores.add_silence(fleet.data_dir, "acme", 3600, "db-*", None, "patching db", database=fleet.database)
    running = start_in_thread(settings.replace(http_port=0))
    yield running
    running.stop()


def test_firing_alerts_at_a_glance_and_per_machine(browser, site, fleet):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.wait_for_selector("#machines tbody tr")
    expect(page.locator("#count-firing")).to_have_text("2")
    assert "on" in page.get_attribute("#alerts-card", "class")
    badge = page.locator("tr[data-machine='web-1'] .flag.alert")
    expect(badge).to_have_text("2 alerts")
    assert "critical" in badge.get_attribute("class")
    assert page.locator("tr[data-machine='web-2'] .flag.alert").count() == 0
    firing = page.locator("#alert-list li[data-alert]")
    expect(firing).to_have_count(2)
    assert "g-1" not in page.content()  # another org's alert never shows
    assert page.evaluate("window.__pwned === undefined")  # a summary is text, never HTML
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "alerts.png"), full_page=True)

    page.click("#alerts-panel [data-tab='resolved']")
    expect(page.locator("#alert-list li[data-alert]")).to_have_count(1)
    assert "db-1" in page.text_content("#alert-list")
    page.click("#alerts-panel [data-tab='silences']")
    expect(page.locator("#alert-list li[data-silence]")).to_have_count(1)
    assert "patching db" in page.text_content("#alert-list")

    page.click("tr[data-machine='web-1']")
    page.wait_for_selector("#detail:not([hidden])")
    expect(page.locator("#d-alerts li[data-alert]")).to_have_count(2)
    page.close()


def test_no_alerts_reads_all_quiet(browser, fleet, settings):  # noqa: F811
    fleet.machine("acme", "web-1")
    running = start_in_thread(settings.replace(http_port=0))
    try:
        page = browser.new_page()
        page.goto(f"{running.url}/#token={fleet.acme.reader_key}")
        page.wait_for_selector("#machines tbody tr")
        expect(page.locator("#count-firing")).to_have_text("0")
        expect(page.locator("#alert-list")).to_contain_text("All quiet")
        page.close()
    finally:
        running.stop()
