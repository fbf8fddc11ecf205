"""The dashboard in a real browser (Debian's chromium and chromedriver, driven by selenium,
headless) against a real ``jobd-http`` and a real jobd: sign in with a token, watch a
running job's bar move, open its page, cancel it, see it end ``cancelled``; and the page
fits a 360-pixel-wide phone screen.

Without chromium, chromedriver or selenium these tests skip, unless
``JOBD_REQUIRE_BROWSER=1`` makes that a failure. One test runs by default (CI); the
slower checks (admin controls, filters, "load more", retry, sign-out) run with
``JOBD_BROWSER_FULL=1``. A screenshot of each test's last page is saved under
``JOBD_ARTIFACTS`` (default: the test's tmp dir).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from served import Gateway

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
_MISSING = [what for what, there in (
    ("chromium", os.access(CHROMIUM, os.X_OK)),
    ("chromium-driver", os.access(CHROMEDRIVER, os.X_OK)),
    ("selenium", importlib.util.find_spec("selenium") is not None)) if not there]
if _MISSING:
    _WHY = (f"{', '.join(_MISSING)} not installed: apt-get install chromium chromium-driver "
            "and pip install selenium for the browser tests")
    if os.environ.get("JOBD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"JOBD_REQUIRE_BROWSER=1 but {_WHY}", pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

import httpx  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException, StaleElementReferenceException)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_dashboard import bearer, daemon, gateway, token  # noqa: E402,F401  (fixtures)

full = pytest.mark.skipif(os.environ.get("JOBD_BROWSER_FULL") != "1",
                          reason="a slower browser check: set JOBD_BROWSER_FULL=1")


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where screenshots go: ``JOBD_ARTIFACTS`` (CI keeps it), else the test's tmp dir."""
    where = Path(os.environ.get("JOBD_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
def browser(request: pytest.FixtureRequest, artifacts: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(arg)
    # the driver's path is given, so selenium downloads nothing
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(artifacts / f"{request.node.name}.png"))
        driver.quit()


def until(driver: WebDriver, check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds, else a failure saying
    what was awaited. An element a poll has just replaced is looked up again."""
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(
        lambda _: check(), message=f"the page did not show {what} within {timeout} s")


def text(driver: WebDriver, selector: str) -> str | None:
    """The text an element shows now, read in one script (polls replace list items)."""
    return driver.execute_script(  # type: ignore[no-any-return]
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : null",
        selector)


def sign_in(driver: WebDriver, url: str, user: str, admin: bool = False) -> None:
    driver.get(url + "/")
    field = until(driver, lambda: driver.find_element(By.ID, "token"), "the token field")
    field.send_keys(token(user, admin))
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button[type=submit]").click()
    until(driver, lambda: driver.find_element(By.ID, "overview").is_displayed(),
          "the overview after signing in")


def progress_of(element: WebElement) -> float:
    return float(element.get_property("value"))


def access_log(gateway: Gateway) -> list[str]:
    """The request lines jobd-http logged (uvicorn's access log)."""
    lines = []
    for line in gateway.stderr.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("logger") == "uvicorn.access":
            lines.append(event["event"])
    return lines


def test_a_user_signs_in_watches_a_job_move_and_cancels_it(
        gateway: Gateway, browser: WebDriver) -> None:
    alice = bearer("alice")
    job = httpx.post(gateway.url + "/api/jobs", json={"type": "crawl"}, headers=alice).json()
    sign_in(browser, gateway.url, "alice")
    assert not browser.find_element(By.ID, "admin").is_displayed(), \
        "a plain user sees the admin controls"

    # the overview: the job's bar in the running list moves between two polls
    row = f'#running li[data-job-id="{job["id"]}"]'
    bar = f"{row} progress"
    first = until(browser, lambda: progress_of(browser.find_element(By.CSS_SELECTOR, bar))
                  or None, "the running job's bar above 0")
    until(browser, lambda: progress_of(browser.find_element(By.CSS_SELECTOR, bar)) > first,
          "the running job's bar moving")
    assert "page " in (text(browser, f"{row} .message") or "")
    unnamed = browser.execute_script("""
        return [...document.querySelectorAll('input, select, progress, button')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !e.textContent.trim())
            .map(e => e.outerHTML)""")
    assert unnamed == [], f"controls without a name for a screen reader: {unnamed}"

    # its page: live progress from the stream, the log followed while it runs
    browser.find_element(By.CSS_SELECTOR, f"{row} a.job-link").click()
    until(browser, lambda: browser.current_url.endswith(f"#/jobs/{job['id']}"), "the job's URL")
    status = browser.find_element(By.ID, "job-status")
    until(browser, lambda: status.text == "running", "the job running")
    shown = progress_of(browser.find_element(By.ID, "job-progress"))
    until(browser, lambda: progress_of(browser.find_element(By.ID, "job-progress")) > shown,
          "the job page's bar moving", timeout=5)
    lines = browser.find_element(By.ID, "job-log").text.count("page ")
    until(browser, lambda: browser.find_element(By.ID, "job-log").text.count("page ") > lines,
          "the log growing", timeout=8)

    browser.find_element(By.ID, "job-cancel").click()
    until(browser, lambda: status.text == "cancelled", "the job ending cancelled")
    pages = [int(k) for k in re.findall(r"page (\d+) of 100",
                                        browser.find_element(By.ID, "job-log").text)]
    assert pages == sorted(set(pages)), f"the log shows lines twice or out of order: {pages}"
    until(browser, lambda: "cancelled" in browser.find_element(By.ID, "job-events").text,
          "the cancel in the job's events")
    assert not browser.find_element(By.ID, "job-cancel").is_displayed()
    assert browser.find_element(By.ID, "job-retry").is_displayed(), "no retry for a cancelled job"
    assert httpx.get(f"{gateway.url}/api/jobs/{job['id']}", headers=alice
                     ).json()["status"] == "cancelled"

    # the token stayed in the tab and in headers: no URL the page asked for held it
    kept = browser.execute_script("return sessionStorage.getItem('jobd.token')")
    assert kept and kept.count(".") == 2
    requests = access_log(gateway)
    assert any(f"/api/jobs/{job['id']}/stream" in r for r in requests), \
        "the job page did not read the stream"
    assert not [r for r in requests if kept in r or "token" in r.lower()], requests
    assert kept not in browser.current_url


def test_an_older_state_of_the_job_never_replaces_a_newer_one(
        gateway: Gateway, browser: WebDriver) -> None:
    """The cancel's answer and the stream's events race: when the job's end came first on
    the stream, the answer's older state (running, cancelling) must not show after it (a
    run under load once left a cancelled job showing "running" for good)."""
    alice = bearer("alice")
    job = httpx.post(gateway.url + "/api/jobs", json={"type": "crawl"}, headers=alice).json()
    httpx.delete(f"{gateway.url}/api/jobs/{job['id']}", headers=alice)
    ended = httpx.get(f"{gateway.url}/api/jobs/{job['id']}", headers=alice).json()
    for _ in range(100):
        if ended["status"] == "cancelled":
            break
        time.sleep(0.05)
        ended = httpx.get(f"{gateway.url}/api/jobs/{job['id']}", headers=alice).json()
    assert ended["status"] == "cancelled", ended
    sign_in(browser, gateway.url, "alice")
    browser.get(f"{gateway.url}/#/jobs/{job['id']}")
    status = browser.find_element(By.ID, "job-status")
    until(browser, lambda: status.text == "cancelled", "the cancelled job's page")
    stale = dict(ended, status="running", cancel_requested=True, completed_at=None,
                 version=ended["version"] - 1)
    browser.execute_script("renderJob(arguments[0])", stale)  # as a late cancel answer would
    assert status.text == "cancelled"
    assert browser.find_element(By.ID, "job-retry").is_displayed()


def test_the_page_fits_a_360_pixel_screen(gateway: Gateway, browser: WebDriver) -> None:
    alice = bearer("alice")
    # long unbroken names and messages are what push a narrow page wide
    job = httpx.post(gateway.url + "/api/jobs", json={
        "type": "crawl", "projectId": "org/" + "a-very-long-repository-name" * 6,
        "description": "x" * 300}, headers=alice).json()
    browser.set_window_size(360, 780)
    sign_in(browser, gateway.url, "alice")
    width = browser.execute_script("return innerWidth")
    assert width <= 360, f"the window is {width} px wide, not a phone's"

    def fits() -> bool:
        return browser.execute_script(
            "return document.scrollingElement.scrollWidth <= innerWidth")

    until(browser, lambda: browser.find_elements(
        By.CSS_SELECTOR, f'li[data-job-id="{job["id"]}"]'), "the job in the overview")
    assert fits(), "the overview scrolls sideways at 360 px"
    browser.get(f"{gateway.url}/#/jobs/{job['id']}")
    until(browser, lambda: browser.find_element(By.ID, "job-log").text, "the job's log")
    assert fits(), "the job page scrolls sideways at 360 px"
    httpx.delete(f"{gateway.url}/api/jobs/{job['id']}", headers=alice)



def test_signing_in_while_jobd_is_down_keeps_the_token_and_the_page_recovers(
        browser: WebDriver, tmp_path: Path) -> None:
    """jobd restarting behind the gateway (503) is no reason to sign out: the token stays,
    the page says what is wrong, and once jobd answers the overview and the admin's
    controls come back on their own (they used to stay hidden until a reload)."""
    from conftest import Daemon
    from test_dashboard import DASHBOARD_CONFIG, SECRET
    from served import WEB_ENV
    down = Daemon(tmp_path / "jobd", DASHBOARD_CONFIG, WEB_ENV)  # not started yet
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    (tmp_path / "empty.toml").write_text("")
    with Gateway(tmp_path, "--config", str(tmp_path / "empty.toml"), "--socket",
                 str(down.socket), "--jwt-secret-file", str(tmp_path / "secret"),
                 "--algorithm", "HS256") as gateway:
        sign_in(browser, gateway.url, "root", admin=True)
        notice = browser.find_element(By.ID, "notice")
        until(browser, lambda: notice.is_displayed() and notice.text, "why nothing loads")
        assert browser.execute_script("return sessionStorage.getItem('jobd.token')"), \
            "signed out because jobd was down"
        assert browser.find_element(By.ID, "who").is_displayed()
        assert not browser.find_element(By.ID, "admin").is_displayed()
        down.start()
        try:
            until(browser, lambda: browser.find_element(By.ID, "admin").is_displayed(),
                  "the admin's controls once jobd answers", timeout=15)
            until(browser, lambda: not notice.is_displayed(), "the notice cleared")
            assert "(admin)" in browser.find_element(By.ID, "who").text
        finally:
            assert down.stop() == 0

@full
def test_an_admin_pauses_dispatch_sees_why_a_job_waits_and_filters_by_user(
        gateway: Gateway, browser: WebDriver) -> None:
    sign_in(browser, gateway.url, "ada", admin=True)
    state = browser.find_element(By.ID, "admin-state")
    until(browser, lambda: "Dispatch runs." in state.text, "the admin controls")
    assert browser.find_element(By.ID, "f-user").is_displayed(), "no user filter for an admin"
    try:
        browser.find_element(By.ID, "pause").click()
        until(browser, lambda: "Dispatch is paused." in state.text, "dispatch paused")
        assert browser.find_element(By.ID, "resume").is_displayed()
        job = httpx.post(gateway.url + "/api/jobs", json={"type": "crawl"},
                         headers=bearer("bob")).json()
        row = f'#queued li[data-job-id="{job["id"]}"]'
        waiting = until(browser, lambda: text(browser, row), "bob's job in the queue")
        assert "dispatch is paused" in waiting and "position 1" in waiting, waiting
        assert "user bob" in waiting

        for user, listed in (("alice", False), ("bob", True)):
            field = browser.find_element(By.ID, "f-user")
            field.clear()
            field.send_keys(user)
            browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
            until(browser, lambda: bool(browser.find_elements(By.CSS_SELECTOR, row)) == listed,
                  f"bob's job {'listed' if listed else 'gone'} for user {user}")

        browser.find_element(By.ID, "maintenance-reason").send_keys("upgrading jobd")
        browser.find_element(By.ID, "maintenance-on").click()
        until(browser, lambda: "Maintenance is on." in state.text, "maintenance on")
        assert "Reason: upgrading jobd." in state.text, state.text
        refused = httpx.post(gateway.url + "/api/jobs", json={"type": "crawl"},
                             headers=bearer("bob"))
        assert refused.status_code == 503 and "upgrading jobd" in refused.text
        browser.find_element(By.ID, "maintenance-off").click()
        until(browser, lambda: "Maintenance is off." in state.text, "maintenance off")

        browser.find_element(By.ID, "resume").click()
        until(browser, lambda: "Dispatch runs." in state.text, "dispatch resumed")
        until(browser, lambda: browser.find_elements(
            By.CSS_SELECTOR, f'#running li[data-job-id="{job["id"]}"]'), "bob's job running")
    finally:
        admin = bearer("ada", admin=True)
        httpx.post(gateway.url + "/api/admin/maintenance", json={"enabled": False},
                   headers=admin)
        httpx.post(gateway.url + "/api/admin/resume", headers=admin)
    httpx.delete(f"{gateway.url}/api/jobs/{job['id']}", headers=bearer("bob"))


@full
def test_load_more_pages_the_finished_jobs_and_retry_and_sign_out_work(
        gateway: Gateway, browser: WebDriver) -> None:
    carol, admin = bearer("carol"), bearer("ada", admin=True)
    httpx.post(gateway.url + "/api/admin/pause", headers=admin)
    try:
        ids = []
        for _ in range(23):  # cancelled while queued: finished at once, none runs
            job = httpx.post(gateway.url + "/api/jobs", json={"type": "crawl"},
                             headers=carol).json()
            httpx.delete(f"{gateway.url}/api/jobs/{job['id']}", headers=carol)
            ids.append(job["id"])
    finally:
        httpx.post(gateway.url + "/api/admin/resume", headers=admin)
    sign_in(browser, gateway.url, "carol")
    assert not browser.find_element(By.ID, "f-user-field").is_displayed()
    browser.find_element(By.ID, "f-status").send_keys("cancelled")
    browser.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    until(browser, lambda: not browser.find_element(By.ID, "running").is_displayed(),
          "only the finished jobs for status cancelled")

    def shown() -> list[str]:
        # in one script: each poll puts new list items in place
        return browser.execute_script("return [...document.querySelectorAll("
                                      "'#finished li.job')].map(li => li.dataset.jobId)")

    until(browser, lambda: len(shown()) == 20, "a first page of 20")
    more = browser.find_element(By.CSS_SELECTOR, "#finished .more")
    more.click()
    until(browser, lambda: len(shown()) == 23, "all 23 after load more")
    assert sorted(shown()) == sorted(ids) and not more.is_displayed()
    time.sleep(2.5)  # a poll keeps what "load more" added
    assert len(shown()) == 23

    browser.find_element(By.CSS_SELECTOR, f'li[data-job-id="{ids[0]}"] a.job-link').click()
    until(browser, lambda: browser.find_element(By.ID, "job-status").text == "cancelled",
          "the cancelled job's page")
    browser.find_element(By.ID, "job-retry").click()
    until(browser, lambda: browser.find_element(By.ID, "job-status").text == "running",
          "the retried job running")
    browser.find_element(By.ID, "job-cancel").click()
    until(browser, lambda: browser.find_element(By.ID, "job-status").text == "cancelled",
          "the retried job cancelled again")

    browser.find_element(By.ID, "sign-out").click()
    until(browser, lambda: browser.find_element(By.ID, "sign-in").is_displayed(),
          "the sign-in field after signing out")
    assert browser.execute_script("return sessionStorage.getItem('jobd.token')") is None


@full
def test_polls_go_one_at_a_time_and_stop_while_the_tab_is_hidden(
        gateway: Gateway, browser: WebDriver) -> None:
    sign_in(browser, gateway.url, "dave")
    # count the page's calls as they go: how many at once, and how many in all
    browser.execute_script("""
        const real = window.fetch;
        window.calls = {open: 0, most: 0, all: 0};
        window.fetch = async (...args) => {
            calls.open += 1; calls.all += 1; calls.most = Math.max(calls.most, calls.open);
            try { return await real(...args); } finally { calls.open -= 1; }
        };""")

    def calls() -> dict[str, int]:
        return browser.execute_script("return {...window.calls}")  # type: ignore[no-any-return]

    until(browser, lambda: calls()["all"] >= 6, "two polls of the three lists")
    assert calls()["most"] == 1, calls()

    browser.execute_script("""
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});
        document.dispatchEvent(new Event('visibilitychange'));""")
    time.sleep(0.5)  # a poll under way may end
    hidden = calls()["all"]
    time.sleep(4.5)
    assert calls()["all"] == hidden, "the page polled while hidden"

    browser.execute_script("""
        Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});
        document.dispatchEvent(new Event('visibilitychange'));""")
    until(browser, lambda: calls()["all"] >= hidden + 3, "polls again once visible", timeout=5)
    assert calls()["most"] == 1, calls()
