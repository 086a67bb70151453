"""A Python project's page in a real browser: Debian's headless Chromium, driven by selenium
through Debian's chromedriver, against a real `batlehub serve` to which real twine uploaded a
wheel whose long description (Markdown) carries `<script>`, `onerror=` and `javascript:`
payloads. The page shows what a Python user looks for and runs nothing: a hook installed before
any page script records every JS dialog, and the page title is what the payloads would change.

The screenshot lands in docs/screenshots/package-pypi.png (committed, so a person can look at the
page without running anything); each run writes it again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batlehub_pypi_testing.clients import client_env, ok, twine_upload
from batlehub_pypi_testing.packages import write_wheel
from pypi_testdata import basic

from batlehub.testing.browser import (
    NEEDS_CHROMIUM,
    assert_readme_runs_nothing,
    have_chromium,
    headless_chromium,
    no_dialogs,
)
from batlehub.testing.hub import HubFactory, token_auth_toml

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.skipif(not have_chromium(), reason=NEEDS_CHROMIUM)
SCREENSHOTS = Path(__file__).resolve().parents[3] / "docs" / "screenshots"
ALICE = "bh_alice-pypi-browser-token-0123456789"
HOSTILE_README = """# Acme widgets

Widgets for **everyone**. Install with pip.

<script>document.title = "pwned-script"; alert("script")</script>

<img src="x" onerror="document.title = 'pwned-onerror'; alert('onerror')">

<a href="javascript:alert('link')" id="js-link">a javascript: link</a> and [another](javascript:alert('md'))

<svg onload="alert('svg')"></svg><iframe src="javascript:alert('frame')"></iframe>

![tracking pixel](https://tracker.example/pixel.png)

```python
import acme_widgets
```
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path / "chromium-profile") as driver:
        yield driver


def text(driver: Any) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


async def test_a_python_project_page_in_chromium_shows_what_pip_users_need_and_runs_nothing(
    hub: HubFactory, browser: Any, tmp_path: Path
) -> None:
    config = token_auth_toml({"alice": (ALICE, "user")})
    config += '[[registries]]\ntype = "pypi"\nname = "python"\nmode = "local"\n'
    server = await hub(config)
    out = tmp_path / "dist"
    headers = ["Requires-Python: >=3.9", "Description-Content-Type: text/markdown", "License: MIT"]
    deps = ("requests>=2.31", 'uvloop>=0.19; extra == "fast"')
    old = write_wheel("acme-widgets", "1.0.0", out, summary="Widgets for everyone", description="# old")
    wheel = write_wheel(
        "acme-widgets", "1.1.0", out, summary="Widgets for everyone", headers=headers,
        dependencies=deps, description=HOSTILE_README,
    )  # fmt: skip
    broken = write_wheel("acme-widgets", "1.2.0", out, summary="Broken widgets", description="# broken")
    env = client_env(tmp_path)
    ok(twine_upload(f"{server.url}/registries/python/", [old, wheel, broken], env, ALICE))
    async with aiohttp.ClientSession(headers=basic(ALICE)) as session:
        yank = {"reason": "the wheel misses a module"}
        async with session.post(f"{server.url}/registries/python/pypi/acme-widgets/1.2.0/yank", json=yank) as r:
            assert r.status == 200, await r.text()
    driver = browser

    # Find it in the package list, with its format and latest version.
    driver.get(server.url + "/")
    search = driver.find_element(By.ID, "q")
    search.send_keys("widgets")
    search.send_keys(Keys.ENTER)
    WebDriverWait(driver, 10).until(lambda d: "Packages matching" in text(d))
    rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.packages tbody tr")]
    assert rows == ["acme-widgets Widgets for everyone 1.1.0 pypi python local"], rows

    driver.find_element(By.LINK_TEXT, "acme-widgets").click()
    WebDriverWait(driver, 10).until(lambda d: "Readme" in text(d))
    await asyncio.sleep(0.5)  # an onerror would fire after the failed image load
    assert driver.title == "acme-widgets · BatleHub"
    no_dialogs(driver)
    seen = text(driver)
    assert "acme-widgets 1.1.0" in seen and "Widgets for everyone" in seen
    installs = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "pre.install code")]
    index = f"{server.url}/registries/python/simple/"
    assert installs[:2] == ["pip install acme-widgets==1.1.0", f"pip install --index-url {index} acme-widgets"]
    facts = driver.find_element(By.CSS_SELECTOR, "dl.facts").text
    for fact in ("Requires-Python\n>=3.9", "License\nMIT", "Owners\nalice", f"Index URL\n{index}"):
        assert fact in facts, facts
    deps_seen = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "ul.deps li")]
    assert deps_seen == ["requests >=2.31", "uvloop >=0.19"]
    files = driver.find_element(By.XPATH, "//section[h2[starts-with(., 'Files of')]]").text
    assert "acme_widgets-1.1.0-py3-none-any.whl" in files
    assert f"sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}" in files

    readme = driver.find_element(By.CSS_SELECTOR, ".readme")
    assert readme.find_element(By.TAG_NAME, "h1").text == "Acme widgets"
    assert readme.find_element(By.CSS_SELECTOR, "pre code").text == "import acme_widgets"
    assert_readme_runs_nothing(driver, "/packages/python/acme-widgets")

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.min(document.documentElement.scrollHeight, 2400)")
    driver.set_window_size(1280, max(900, int(height)))
    driver.save_screenshot(str(SCREENSHOTS / "package-pypi.png"))
    driver.set_window_size(1280, 900)

    versions = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.versions tbody tr")]
    assert (
        len(versions) == 3
        and versions[0].startswith("1.2.0 ")
        and versions[0].endswith("yanked the wheel misses a module")
    ), versions

    # Another version from the version list.
    driver.find_element(By.LINK_TEXT, "1.0.0").click()
    WebDriverWait(driver, 10).until(lambda d: "acme-widgets 1.0.0" in text(d))
    assert "pip install acme-widgets==1.0.0" in text(driver)
    no_dialogs(driver)
