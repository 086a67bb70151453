"""A real browser for UI tests: Debian's headless Chromium driven by selenium through Debian's
chromedriver (`scripts/test` installs both). Selenium is given both paths, so it never goes and
downloads a browser or a driver.

    pytestmark = pytest.mark.skipif(not have_chromium(), reason=NEEDS_CHROMIUM)

    with headless_chromium(tmp_path / "profile") as driver:
        driver.get(url)
        ...

Every page the driver opens records the dialogs it tries to open (`alert`, `confirm`, `prompt`)
in `window.__dialogs` instead of blocking on them, so a test can assert that a hostile page
opened none.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
NEEDS_CHROMIUM = "needs Debian's chromium and chromium-driver (scripts/test installs them)"
DIALOG_HOOK = """
window.__dialogs = [];
for (const kind of ["alert", "confirm", "prompt"]) {
  window[kind] = (message) => { window.__dialogs.push(kind + ": " + message); return null; };
}
"""
_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


def have_chromium() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@contextmanager
def headless_chromium(profile: Path, *, clipboard: bool = False) -> Iterator[Any]:
    """A selenium driver of a fresh headless Chromium whose profile lives in `profile`. With
    `clipboard`, pages may write the clipboard, as a person's browser lets a page they clicked
    on do (headless asks nobody)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DIALOG_HOOK})
        if clipboard:
            driver.execute_cdp_cmd(
                "Browser.grantPermissions", {"permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}
            )
        driver.implicitly_wait(3)
        yield driver
    finally:
        driver.quit()


def no_dialogs(driver: Any) -> None:
    """Assert the page opened no JS dialog (neither a real one nor one caught by `DIALOG_HOOK`)."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        alert = driver.switch_to.alert
        raise AssertionError(f"a JS dialog opened: {alert.text}")
    except NoAlertPresentException:
        pass
    assert driver.execute_script("return window.__dialogs") == []


_README_THREATS = (
    "const r = document.querySelector('.readme');"
    "return [r.querySelectorAll('script, iframe, svg, [onerror], [onload]').length,"
    " [...r.querySelectorAll('a')].filter(a => (a.getAttribute('href') || '').match(/^\\s*javascript:/i)).length,"
    " [...document.images].filter(i => i.src.includes('tracker.example')).length]"
)


def assert_readme_runs_nothing(driver: Any, page_path: str) -> None:
    """On a package page showing a hostile README (scripts, event handlers, a `javascript:` link
    titled "a javascript: link", a tracker image, code that logs "pwned"): none of it survived,
    clicking the link leaves the browser on `page_path`, and nothing ran."""
    from selenium.webdriver.common.by import By

    assert driver.execute_script(_README_THREATS) == [0, 0, 0]
    driver.find_element(By.XPATH, "//div[@class='readme']//a[text()='a javascript: link']").click()
    no_dialogs(driver)
    assert driver.current_url.endswith(page_path)
    assert not [e for e in driver.get_log("browser") if "pwned" in e["message"]]
