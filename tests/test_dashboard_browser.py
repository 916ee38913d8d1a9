"""The dashboard in a real browser: Debian's headless Chromium driven by selenium, with the system's
chromedriver (nothing is downloaded). The page loads with no console error and only same-origin
requests, its counters advance, Pause and Resume reach the engine, read-only mode shows no admin
control, and all of it works under a URL prefix.

Skipped without selenium or Chromium, unless ``TOKENGATE_REQUIRE_BROWSER=1`` (CI sets it): then a
missing browser fails the test. ``TOKENGATE_SCREENSHOT=PATH`` saves a screenshot of the page."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

import tokengate
from tokengate import OperationsCoordinator, task_token_guard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

try:
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - depends on the environment
    webdriver = None  # type: ignore[assignment]

_missing = webdriver is None or CHROMIUM is None or DRIVER is None
if _missing and os.environ.get("TOKENGATE_REQUIRE_BROWSER") == "1":
    raise RuntimeError("TOKENGATE_REQUIRE_BROWSER=1 but selenium, chromium or chromedriver is missing")
pytestmark = pytest.mark.skipif(_missing, reason="needs selenium and Debian's chromium + chromium-driver")


@task_token_guard(operation_type="browser_op")
def browser_op(x: float) -> float:
    time.sleep(x)
    return x


@pytest.fixture
def driver() -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # selenium manager: never download a driver
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(executable_path=str(DRIVER)))
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def busy() -> Iterator[OperationsCoordinator]:
    """A coordinator running a steady trickle of tokens."""
    stop = threading.Event()

    def feed() -> None:
        while not stop.is_set():
            tokengate.gather([browser_op(0.005) for _ in range(5)])

    with OperationsCoordinator(max_workers=2) as c:
        browser_op(0).result()
        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            yield c
        finally:
            stop.set()
            # A test that failed with the operation paused must not leave the feeder waiting.
            c.resume_operation("browser_op")
            c.resume_admission()
            feeder.join()


def wait_for(what: Callable[[], Any], timeout: float = 10, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out: {message}"
        time.sleep(0.05)


def api_op(server: tokengate.DashboardServer, prefix: str, name: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", f"{prefix}/api/v1/ops", headers={"Authorization": f"Bearer {server.token}"})
        ops = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    (op,) = [o for o in ops if o["name"] == name]
    return op


def click(driver: Any, css: str) -> None:
    """Clicks the element `css` names, finding it again if the page replaced it meanwhile."""

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, css).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    wait_for(attempt, message=f"click {css}")


def open_page(driver: Any, server: tokengate.DashboardServer) -> None:
    driver.get(server.url)
    wait_for(lambda: driver.find_element(By.ID, "status").text == "live", message="the page went live")


def check_clean_and_same_origin(driver: Any, server: tokengate.DashboardServer) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    origin = f"http://{server.host}:{server.port}"
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert urls, "no request seen"
    foreign = [u for u in urls if f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" != origin]
    assert not foreign, foreign


@pytest.mark.parametrize("prefix", ["", "/ops/tokengate"])
def test_admin_page_is_live_and_pause_and_resume_reach_the_engine(
    driver: Any, busy: OperationsCoordinator, prefix: str
) -> None:
    with busy.serve(admin=True, url_prefix=prefix) as server:
        open_page(driver, server)
        assert driver.current_url == f"http://{server.host}:{server.port}{prefix}/", "the token left the URL"
        first = int(driver.find_element(By.ID, "completed").text)
        wait_for(lambda: int(driver.find_element(By.ID, "completed").text) > first, message="counters advance")
        row = 'tr[data-op="browser_op"]'
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, row), message="the operation's row")
        click(driver, f'{row} button[data-action$="/pause"]')
        t0 = time.monotonic()
        wait_for(lambda: api_op(server, prefix, "browser_op")["paused"], timeout=2, message="pause reached the API")
        assert time.monotonic() - t0 < 2
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, f'{row} button[data-action$="/resume"]'))
        if os.environ.get("TOKENGATE_SCREENSHOT") and not prefix:
            driver.save_screenshot(os.environ["TOKENGATE_SCREENSHOT"])
        click(driver, f'{row} button[data-action$="/resume"]')
        wait_for(
            lambda: not api_op(server, prefix, "browser_op")["paused"], timeout=2, message="resume reached the API"
        )
        check_clean_and_same_origin(driver, server)


@pytest.mark.parametrize("prefix", ["", "/ops/tokengate"])
def test_read_only_page_shows_no_admin_controls(driver: Any, busy: OperationsCoordinator, prefix: str) -> None:
    with busy.serve(url_prefix=prefix) as server:
        open_page(driver, server)
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, 'tr[data-op="browser_op"]'), message="rows")
        assert driver.find_element(By.ID, "mode").text == "read-only"
        assert driver.find_elements(By.TAG_NAME, "button") == []
        header = driver.find_element(By.CSS_SELECTOR, "#ops th.admin-only")
        assert not header.is_displayed()
        check_clean_and_same_origin(driver, server)
