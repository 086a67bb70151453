"""The web UI in a real browser: Debian's headless Chromium, driven by selenium through Debian's
chromedriver, against a real `batlehub serve` with an npm registry whose packages were published
over HTTP. A person would search, open a package, read its README, sign in, make and revoke a
token, set a banner, lift an IP block, block a version and ask why; so does this test. A README carrying `<script>`,
`onerror=` and `javascript:` payloads must run nothing: a hook installed before any page script
records every JS dialog, and the page title is what those payloads would change.

The screenshots land in docs/screenshots/ (committed, so a person can look at the pages without
running anything); each run writes them again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batlehub.testing.browser import (
    NEEDS_CHROMIUM,
    assert_readme_runs_nothing,
    have_chromium,
    headless_chromium,
    no_dialogs,
)
from batlehub.testing.hub import HubFactory, token_auth_toml

pytest.importorskip("batlehub_npm")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.skipif(not have_chromium(), reason=NEEDS_CHROMIUM)
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"

ADMIN = "bh_admin-browser-token-0123456789"
ALICE = "bh_alice-browser-token-0123456789"
HOSTILE_README = """# hostile-readme

This README tries everything a package author could slip into a page.

<script>document.title = "pwned-script"; alert("script")</script>

<img src="x" onerror="document.title = 'pwned-onerror'; alert('onerror')">

<a href="javascript:alert('link')" id="js-link">a javascript: link</a> and [another](javascript:alert('md'))

<svg onload="alert('svg')"></svg><iframe src="javascript:alert('frame')"></iframe>

![tracking pixel](https://tracker.example/pixel.png)

It is **harmless** here.
"""
# Runs before any script of every page (CDP bypasses the page's CSP): every dialog is recorded.


def tarball(name: str, version: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = json.dumps({"name": name, "version": version}).encode()
        info = tarfile.TarInfo("package/package.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def publish_body(name: str, version: str, readme: str, **manifest: Any) -> dict[str, Any]:
    data = tarball(name, version)
    return {
        "_id": name,
        "name": name,
        "description": manifest.get("description", ""),
        "dist-tags": {"latest": version},
        "versions": {
            version: {
                "name": name,
                "version": version,
                "readme": readme,
                "_id": f"{name}@{version}",
                "dist": {
                    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode(),
                    "shasum": hashlib.sha1(data).hexdigest(),
                },
                **manifest,
            }
        },
        "readme": readme,
        "_attachments": {
            f"{name}-{version}.tgz": {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(data).decode(),
                "length": len(data),
            }
        },
    }


PACKAGES = [
    (
        "left-pad",
        "1.3.0",
        "# left-pad\n\nString left pad, **the** classic.\n\n```js\nconst leftPad = require('left-pad')\n"
        "leftPad('foo', 5)  // => '  foo'\n```\n\n| option | meaning |\n|---|---|\n| `len` | width |\n",
        {
            "description": "String left pad",
            "license": "WTFPL",
            "keywords": ["pad", "string"],
            "engines": {"node": ">=18"},
            "repository": {"type": "git", "url": "git+https://git.example/left-pad.git"},
        },
    ),
    (
        "@acme/widget",
        "2.4.1",
        "# widget\n\nAcme's widget.",
        {"description": "The Acme widget", "dependencies": {"left-pad": "^1.3.0", "lodash": "^4.17.21"}},
    ),
    ("hostile-readme", "0.0.1", HOSTILE_README, {"description": "A README that tries to run script"}),
    ("string-utils", "0.9.0", "# string-utils", {"description": "Small helpers for strings"}),
]


async def publish_all(url: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ALICE}"}) as session:
        for name, version, readme, manifest in PACKAGES:
            body = publish_body(name, version, readme, **manifest)
            async with session.put(f"{url}/registries/npm/{name.replace('/', '%2f')}", json=body) as response:
                assert response.status == 201, await response.text()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path / "chromium-profile", clipboard=True) as driver:
        yield driver


def shot(driver: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.min(document.documentElement.scrollHeight, 2400)")
    driver.set_window_size(1280, max(900, int(height)))
    driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))
    driver.set_window_size(1280, 900)


def text(driver: Any) -> str:
    return str(driver.find_element(By.TAG_NAME, "body").text)


def wait_for(driver: Any, needle: str) -> str:
    """The page's text once it shows `needle`: a click that submits a form returns before the
    next page is there."""

    def shows(d: Any) -> str | None:
        try:
            seen = text(d)
        except StaleElementReferenceException:
            return None
        return seen if needle in seen else None

    return str(WebDriverWait(driver, 10).until(shows, f"the page never showed {needle!r}"))


def status(driver: Any) -> int:
    """The HTTP status of the page the browser shows (as Chromium's navigation timing has it)."""
    return int(driver.execute_script("return performance.getEntriesByType('navigation')[0].responseStatus"))


def sign_in(driver: Any, url: str, token: str) -> None:
    driver.get(url + "/login")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.send_keys(Keys.ENTER)
    wait_for(driver, "Signed in as")


def sign_out(driver: Any) -> None:
    driver.find_element(By.XPATH, "//button[text()='Sign out']").click()
    wait_for(driver, "Sign in")


async def test_a_person_finds_reads_signs_in_and_manages_the_hub(hub: HubFactory, browser: Any) -> None:
    config = token_auth_toml({"admin": (ADMIN, "admin"), "alice": (ALICE, "user")})
    config += '[[registries]]\ntype = "npm"\nname = "npm"\nmode = "local"\n'
    config += "[ip_blocking]\nenabled = true\nviolation_threshold = 1000\n"
    server = await hub(config)
    await publish_all(server.url)
    driver = browser

    # Browse and search.
    driver.get(server.url + "/")
    assert driver.title == "Packages · BatleHub"
    assert "4 packages" in text(driver)
    shot(driver, "packages")
    search = driver.find_element(By.ID, "q")
    search.send_keys("string")
    search.send_keys(Keys.ENTER)
    wait_for(driver, "Packages matching")
    rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.packages tbody tr")]
    assert len(rows) == 2 and rows[0].startswith("left-pad String left pad 1.3.0 npm npm local"), rows

    # Open a package, read its README, copy its install command.
    driver.find_element(By.LINK_TEXT, "left-pad").click()
    wait_for(driver, "Readme")
    assert driver.title == "left-pad · BatleHub"
    readme = driver.find_element(By.CSS_SELECTOR, ".readme")
    assert readme.find_element(By.TAG_NAME, "h1").text == "left-pad"
    assert "leftPad('foo', 5)" in readme.find_element(By.CSS_SELECTOR, "pre code").text
    assert readme.find_element(By.CSS_SELECTOR, "table td code").text == "len"
    copy = driver.find_element(By.CSS_SELECTOR, ".package-side .copy-button")  # added by the hub's script
    copy.click()
    WebDriverWait(driver, 3).until(lambda d: copy.text == "Copied")
    clipboard = driver.execute_async_script("navigator.clipboard.readText().then(arguments[0], arguments[0])")
    assert clipboard == "npm install left-pad"
    shot(driver, "package")
    driver.get(server.url + "/packages/npm/@acme/widget")
    deps = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "ul.deps li")]
    assert deps == ["left-pad ^1.3.0", "lodash ^4.17.21"]
    driver.find_element(By.LINK_TEXT, "left-pad").click()
    wait_for(driver, "String left pad, the classic.")
    assert driver.title == "left-pad · BatleHub"

    # A hostile README runs nothing.
    driver.get(server.url + "/packages/npm/hostile-readme")
    await asyncio.sleep(0.5)  # an onerror would fire after the failed image load
    assert driver.title == "hostile-readme · BatleHub"
    no_dialogs(driver)
    assert_readme_runs_nothing(driver, "/packages/npm/hostile-readme")
    shot(driver, "package-hostile-readme")

    # Keyboard: the first Tab lands on the skip link, which moves focus to the content.
    driver.get(server.url + "/")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert driver.switch_to.active_element.text == "Skip to content"

    # Sign in as a user, create a token, use it, revoke it.
    sign_in(driver, server.url, ALICE)
    driver.find_element(By.LINK_TEXT, "Your tokens").click()
    wait_for(driver, "Create a token")
    driver.find_element(By.ID, "description").send_keys("laptop")
    driver.find_element(By.XPATH, "//button[text()='Create token']").click()
    wait_for(driver, "New token created")
    token = driver.find_element(By.ID, "new-token").text
    assert token.startswith("bh_")
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/api/v1/tokens", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 200 and (await r.json())["user_id"] == "alice"
    shot(driver, "tokens")
    driver.find_element(By.XPATH, "//tr[th[contains(., 'laptop')]]//button[text()='Revoke']").click()
    wait_for(driver, "You have no tokens stored by this hub.")
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/api/v1/tokens", headers={"Authorization": f"Bearer {token}"}) as r:
            assert r.status == 401
    assert not driver.find_elements(By.LINK_TEXT, "Admin")
    driver.get(server.url + "/admin/policies")
    wait_for(driver, "these pages are for admins")
    assert status(driver) == 403
    sign_out(driver)

    # An admin: health, a banner everyone sees, an IP block lifted, the audit log.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as session:
        block = {"ip": "203.0.113.9", "reason": "scraping the registry", "duration_secs": 3600}
        async with session.post(server.url + "/api/v1/admin/ip-blocks", json=block) as r:
            assert r.status == 201
    sign_in(driver, server.url, ADMIN)
    driver.find_element(By.LINK_TEXT, "Admin").click()
    wait_for(driver, "The hub is ok.")
    shot(driver, "admin-health")
    driver.find_element(By.LINK_TEXT, "Banner").click()
    wait_for(driver, "No banner is set.")
    driver.find_element(By.ID, "message").send_keys("Maintenance on Saturday 10:00 UTC: installs keep working")
    driver.find_element(By.CSS_SELECTOR, "#level option[value='warning']").click()
    driver.find_element(By.XPATH, "//button[text()='Set banner']").click()
    wait_for(driver, "Clear banner")
    driver.get(server.url + "/")
    banner = driver.find_element(By.CSS_SELECTOR, ".banner")
    assert banner.text == "Warning: Maintenance on Saturday 10:00 UTC: installs keep working"
    shot(driver, "packages-with-banner")

    driver.get(server.url + "/admin/ip-blocks")
    assert "203.0.113.9 scraping the registry" in text(driver)
    shot(driver, "admin-ip-blocks")
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Lift the block of 203.0.113.9']").click()
    wait_for(driver, "No address is blocked.")

    driver.get(server.url + "/admin/audit")
    driver.find_element(By.ID, "f-action").send_keys("ip_block.remove")
    driver.find_element(By.XPATH, "//button[text()='Filter']").click()
    wait_for(driver, "1 entry")
    rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.audit tbody tr")]
    assert len(rows) == 1 and "admin ip_block.remove" in rows[0] and "203.0.113.9" in rows[0], rows
    driver.get(server.url + "/admin/audit")
    shot(driver, "admin-audit")
    no_dialogs(driver)

    # Policies: block a version, see it listed and refused, ask why, mistype a range, delete it.
    driver.find_element(By.LINK_TEXT, "Policies").click()
    wait_for(driver, "Add a rule")
    assert driver.title == "Admin: policies · BatleHub"
    driver.find_element(By.CSS_SELECTOR, "#rule-kind option[value='block']").click()
    driver.find_element(By.ID, "rule-package").send_keys("left-pad")
    driver.find_element(By.ID, "rule-versions").send_keys("1.3.0")
    driver.find_element(By.ID, "rule-reason").send_keys("compromised release, see incident 42")
    driver.find_element(By.XPATH, "//button[text()='Add rule']").click()
    shown = wait_for(driver, "added: left-pad 1.3.0 in npm")
    rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.rules tbody tr")]
    assert len(rows) == 1 and rows[0].startswith("block left-pad 1.3.0 compromised release, see incident 42"), rows
    assert "admin" in rows[0] and "never" in rows[0], rows
    rule = driver.find_element(By.CSS_SELECTOR, "#policy-added code").text
    assert rule.startswith("block/") and rule in shown
    async with aiohttp.ClientSession() as session:
        tarball_url = server.url + "/registries/npm/left-pad/-/left-pad-1.3.0.tgz"
        async with session.get(tarball_url, headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert r.status == 403 and rule in r.headers["X-BatleHub-Policy"]
    driver.find_element(By.ID, "why-package").send_keys("left-pad")
    driver.find_element(By.ID, "why-version").send_keys("1.3.0")
    driver.find_element(By.XPATH, "//button[text()='Explain']").click()
    wait_for(driver, "What each policy said")
    answer = driver.find_element(By.ID, "why-answer").text
    assert f"left-pad@1.3.0 in npm is blocked by rule {rule} (policy lists)." in answer, answer
    opinions = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "table.opinions tbody tr")]
    assert opinions[0].startswith(f"lists block {rule}"), opinions
    driver.execute_script("window.scrollTo(0, 0)")  # the answer's anchor scrolled the page
    shot(driver, "admin-policies")
    driver.find_element(By.ID, "rule-package").send_keys("left-pad")
    driver.find_element(By.ID, "rule-versions").send_keys(">>1")
    driver.find_element(By.ID, "rule-reason").send_keys("a typo")
    driver.find_element(By.XPATH, "//button[text()='Add rule']").click()
    error = wait_for(driver, "not a semver range")
    assert status(driver) == 400 and "Something went wrong" not in error
    assert driver.find_element(By.ID, "rule-versions").get_attribute("value") == ">>1"  # kept to fix
    assert len(driver.find_elements(By.CSS_SELECTOR, "table.rules tbody tr[id]")) == 1
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Delete the block rule left-pad 1.3.0']").click()
    wait_for(driver, "No rules.")
    assert status(driver) == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(tarball_url, headers={"Authorization": f"Bearer {ALICE}"}) as r:
            assert r.status == 200
    no_dialogs(driver)
