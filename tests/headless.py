"""Headless Chromium for the site tests: the `browser` fixture (conftest.py) and what the tests ask of a page."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def start_browser(profile_dir: Path):
    """A headless Chromium that keeps the console log (skips the test where Debian's chromium is missing)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium / chromedriver not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader",
        f"--user-data-dir={profile_dir}", "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def open_page(driver, path: Path) -> list[dict]:
    """Load a file:// page, wait until it is complete, and return the console log so far."""
    driver.get(path.resolve().as_uri())
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    return driver.get_log("browser")


def severe(logs: list[dict]) -> list[dict]:
    """The console entries that are errors (an uncaught exception, a failed load)."""
    return [entry for entry in logs if entry["level"] == "SEVERE"]


def no_xss(driver) -> None:
    """No planted `alert()` or `window.__xss = …` ran."""
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when no alert() ran
    assert driver.execute_script("return window.__xss === undefined")
