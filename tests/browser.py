"""What the real-browser tests share: Debian's Chromium through Selenium, waiting on the page, logging in.

scripts/test.sh installs Debian's chromium and chromium-driver when they are missing; no browser is downloaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Why no browser can start here, or None.
MISSING = (
    None
    if CHROMIUM.exists() and CHROMEDRIVER.exists()
    else f"{CHROMIUM} or {CHROMEDRIVER} is missing: scripts/test.sh installs Debian's chromium and chromium-driver "
    "with apt-get"
)

# A module whose every test needs the browser: skipped before its fixtures run (`chromium` alone skips only the test).
marks = [*e2e.marks, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


@contextlib.contextmanager
def chromium(profile: Path, window: tuple[int, int]) -> Iterator:
    """A headless Chromium driven by Selenium, with a new profile in `profile`; skips the test where it is missing."""
    if MISSING is not None:
        pytest.skip(MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # As root, on a machine with no network but loopback: no sandbox, and nothing that calls Google at start.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={window[0]},{window[1]}",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition, timeout: float, what: str, driver=None, screenshot: Path | None = None):
    """The first true value of `condition()` within `timeout` s; else fails saying `what`, with a screenshot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    if driver is not None and screenshot is not None:
        driver.save_screenshot(str(screenshot))
    raise AssertionError(f"{what} within {timeout:.0f} s" + (f" (screenshot: {screenshot})" if screenshot else ""))


def log_in(driver, label_studio_url: str, screenshot: Path) -> None:
    """Through Label Studio's login page, as the admin of tests/e2e.py; `screenshot`: the filled form."""
    from selenium.webdriver.common.by import By

    driver.get(f"{label_studio_url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(e2e.ADMIN_EMAIL)
    driver.find_element(By.NAME, "password").send_keys(e2e.ADMIN_PASSWORD)
    driver.save_screenshot(str(screenshot))
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
    failed = screenshot.with_name(f"{screenshot.stem}-failed.png")
    wait_until(lambda: "/user/login" not in driver.current_url, 60, "Label Studio did not let the admin in", driver,
               failed)  # fmt: skip
