"""The pages in a real browser: Debian's Chromium, headless, driven by Playwright.

A user logs in through Airflow's own login form, opens "Exclusive outputs" from Airflow's
UI (the plugin's page in the UI's iframe) and the tab of the task instance that consumed
the queue of a real run, and finds the rows the ledger holds; then releases a stuck claim
through the page's confirmation. A screenshot of each page is written to the folder
``EXCLUSIVE_XCOM_SCREENSHOTS`` names (``docs/img`` refreshes the README's), else to
``exclusive_xcom_screenshots`` in the temporary folder, so a test run leaves the checkout
as it was. Only in the full run (``browser``): starting a browser and a server costs half
a minute.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import require
from tests.ui.server import OPEN_DAG, SECRET_DAG, SECRETS, USERS, UIServer

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("ui_browser"), pytest.mark.timeout(600)]

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections (updates, sync) are
# refused on a closed network, and it slows down waiting for them.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
IMAGES = Path(
    os.environ.get("EXCLUSIVE_XCOM_SCREENSHOTS") or Path(tempfile.gettempdir()) / "exclusive_xcom_screenshots"
)
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        require(f"{CHROMIUM} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server: UIServer) -> Iterator[Any]:
    """A page of a new browser context, logged in as ``op`` through Airflow's login form."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server.base}/auth/login")
    page.locator("input[name='username']").fill("op")
    page.locator("input[name='password']").fill(USERS["op"][1])
    page.locator("button[type='submit']").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)
    try:
        yield page
    finally:
        context.close()


def _rows(frame: Any) -> list[dict[str, str]]:
    """The item rows of the page in the UI's iframe, by column name."""
    frame.locator("tr[data-id]").first.wait_for()
    header = [h.strip() for h in frame.locator("table").first.locator("th").all_inner_texts()]
    rows = []
    for row in frame.locator("tr[data-id]").all():
        rows.append(dict(zip(header, (c.strip() for c in row.locator("td").all_inner_texts()), strict=False)))
    return rows


def test_the_browse_page_lists_the_items_of_the_dags_the_user_may_read(page: Any, server: UIServer) -> None:
    page.goto(f"{server.base}/plugin/exclusive-outputs")
    frame = page.frame_locator("iframe")
    rows = _rows(frame)
    frame.locator("#counts").get_by_text("consumed: 12").wait_for()
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / "ui-outputs.png"))
    assert {r["producer"].split("/")[0] for r in rows} == {OPEN_DAG, SECRET_DAG}
    assert len(rows) == 20
    assert {r["state"] for r in rows} == {"ready", "claimed", "expired", "consumed"}
    text = frame.locator("body").inner_text()
    assert not any(secret in text for secret in SECRETS)


def test_the_task_instance_tab_shows_what_the_consumer_claimed(page: Any, server: UIServer) -> None:
    run = quote(server.runs[OPEN_DAG], safe="")
    page.goto(f"{server.base}/dags/{OPEN_DAG}/runs/{run}/tasks/work/plugin/exclusive-outputs-task")
    frame = page.frame_locator("iframe")
    frame.get_by_text("Claimed by work in this run").wait_for()
    rows = _rows(frame)
    frame.locator("#counts").get_by_text("consumed: 6").wait_for()
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / "ui-task-instance.png"))
    claimed = [r for r in rows if r["owner"].startswith(f"{OPEN_DAG}/work")]
    assert sorted(r["state"] for r in claimed) == ["claimed"] + ["consumed"] * 6
    assert {r["producer"] for r in claimed} == {f"{OPEN_DAG}/enqueue", f"{OPEN_DAG}/seeded"}


def test_releasing_from_the_page_asks_first(page: Any, server: UIServer) -> None:
    item = server.seeded[SECRET_DAG]["expired"]
    page.goto(f"{server.base}/plugin/exclusive-outputs")
    frame = page.frame_locator("iframe")
    row = frame.locator(f"tr[data-id='{item}']")
    row.get_by_role("button", name="Release").click()
    frame.get_by_text(f"Release item {item}").wait_for()
    assert frame.locator(f"tr[data-id='{item}'] td").nth(4).inner_text() == "expired"  # nothing yet
    frame.get_by_role("button", name="Confirm").click()
    frame.get_by_text(f"released item {item}").wait_for()
    assert frame.locator(f"tr[data-id='{item}'] td").nth(4).inner_text() == "released"
