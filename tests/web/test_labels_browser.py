"""Labels in the dashboard (Debian's Chromium via Playwright): chips, click to filter, the filter control,
grouping by a key with each group's counts, and the view kept in the URL."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from fleet.config.labels import labels_json
from fleet.store.labels import set_labels
from tests.web.test_browser import browser, served  # noqa: F401 - the fixtures

pytestmark = pytest.mark.browser
XSS = "<img src=x onerror=\"window.__pwned=1\">"


@pytest.fixture
def site(fleet, served):  # noqa: F811 - the fixture above
    machines = {"web-1": ("online", {"env": "prod", "role": "web"}), "web-2": ("stale", {"env": "dev", "role": "web"}),
                "db-1": ("online", {"env": "prod", "role": "db"}), "db-2": ("offline", {"env": "prod", "role": "db"}),
                "bare": ("online", {"note": XSS})}
    for machine_id, (status, labels) in machines.items():
        fleet.machine("acme", machine_id, status)
        with fleet.db() as db:
            db.execute("UPDATE machines SET agent_labels = ? WHERE machine_id = ?", (labels_json(labels), machine_id))
    with fleet.db() as db:
        set_labels(db, "acme", "bare", ["site=par"], [])
    return served


def _names(page):
    return page.locator("#machines tbody tr[data-machine]").evaluate_all("rows => rows.map(r => r.dataset.machine)")


def test_label_chips_filter_group_and_the_url_keeps_the_view(browser, site, fleet):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # The bad filter's 400 is logged by Chromium itself; any other console error is the page's.
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "status of 400" not in msg.text
            else None)
    page.goto(f"{site.url}/#token={fleet.acme.reader_key}")
    page.wait_for_selector("#machines tbody tr[data-machine]")
    assert sorted(_names(page)) == ["bare", "db-1", "db-2", "web-1", "web-2"]
    row = page.locator('#machines tbody tr[data-machine="web-1"]')
    expect(row.locator(".chip")).to_have_text(["env=prod", "role=web"])
    # A label value is text, never markup; the server label shows beside the agent's.
    expect(page.locator('#machines tbody tr[data-machine="bare"] .chip')).to_have_text([f"note={XSS}", "site=par"])
    assert page.evaluate("window.__pwned === undefined")

    # Click a chip: only machines with that label, the chip marked, the URL says so.
    row.locator('.chip[data-label="env=prod"]').click()
    expect(page.locator("#label-filter")).to_have_value("env=prod")
    expect(page.locator("#machines tbody tr[data-machine]")).to_have_count(3)
    assert sorted(_names(page)) == ["db-1", "db-2", "web-1"]
    assert page.locator("#detail").is_hidden()  # the chip filtered, it did not open the row
    assert "label=env%3Dprod" in page.url
    # Type into the filter control: a negated term narrows further.
    page.fill("#label-filter", "env=prod,role!=db")
    expect(page.locator("#machines tbody tr[data-machine]")).to_have_count(1)
    assert _names(page) == ["web-1"]
    # A bad filter says why, from the server's 400.
    page.fill("#label-filter", "Env=prod")
    expect(page.locator("#label-error")).to_contain_text("'Env'")
    page.fill("#label-filter", "")
    expect(page.locator("#machines tbody tr[data-machine]")).to_have_count(5)
    expect(page.locator("#label-error")).to_be_hidden()

    # Group by env: a header per value with its online / stale / offline counts, machines without it last.
    expect(page.locator("#group-by option[value=env]")).to_have_count(1)
    page.select_option("#group-by", "env")
    page.wait_for_selector("#machines tbody tr.group")
    groups = page.locator("#machines tbody tr.group")
    expect(groups).to_have_count(3)
    expect(groups.nth(0)).to_contain_text("env=dev")
    expect(groups.nth(0)).to_contain_text("0 online")
    expect(groups.nth(0)).to_contain_text("1 stale")
    expect(groups.nth(1)).to_contain_text("env=prod")
    expect(groups.nth(1)).to_contain_text("2 online")
    expect(groups.nth(1)).to_contain_text("1 offline")
    expect(groups.nth(2)).to_contain_text("no env")
    assert _names(page) == ["web-2", "db-1", "db-2", "web-1", "bare"]
    assert "group=env" in page.url

    # The detail view shows the machine's labels as chips too; clicking one filters.
    page.locator('#machines tbody tr[data-machine="bare"]').click()
    expect(page.locator("#d-events li.labels")).to_contain_text("+site=par")
    page.locator('#machines tbody tr[data-machine="db-1"]').click()
    expect(page.locator("#d-labels .chip")).to_have_text(["env=prod", "role=db"])
    expect(page.locator("#d-events li.labels")).to_have_count(0)
    page.locator('#d-labels .chip[data-label="role=db"]').click()
    expect(page.locator("#machines tbody tr[data-machine]")).to_have_count(2)
    assert _names(page) == ["db-1", "db-2"]

    # Reloading the URL restores the view.
    url = page.url
    again = browser.new_page(viewport={"width": 1400, "height": 900})
    again.goto(f"{url}#token={fleet.acme.reader_key}")
    again.wait_for_selector("#machines tbody tr.group")
    expect(again.locator("#label-filter")).to_have_value("role=db")
    expect(again.locator("#group-by")).to_have_value("env")
    assert _names(again) == ["db-1", "db-2"]
    assert not errors, errors
