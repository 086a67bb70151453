"""`npm login` through the browser (npm's default, `--auth-type=web`), with the real npm CLI
against a real `batlehub serve`: npm prints a URL of the hub, the person signed in to the web UI
approves there, and npm gets a new token of theirs; a refusal stops npm with an error."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from batlehub_npm_testing.clients import npm_env, ok, run_npm

from batlehub.testing.hub import Hub, HubFactory, token_auth_toml

pytestmark = [pytest.mark.npm_cli]

ALICE = "bh_alice-web-login-0123456789"
CONFIG = token_auth_toml({"alice": (ALICE, "user")}) + '[[registries]]\ntype = "npm"\nname = "npm"\nmode = "local"\n'


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


async def start_login(registry: str, env: dict[str, str], cwd: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start `npm login` as a script would (no terminal) and return it with the URL it prints."""
    npm = await asyncio.create_subprocess_exec(
        "npm",
        "login",
        "--auth-type=web",
        f"--registry={registry}",
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert npm.stdout is not None
    seen = b""
    async with asyncio.timeout(30):
        while b"/login/cli/" not in seen:
            line = await npm.stdout.readline()
            assert line, f"npm ended without a login URL: {seen.decode(errors='replace')}"
            seen += line
    url = re.search(r"(http://\S+/login/cli/\S+)", seen.decode()).group(1)
    return npm, url


async def answer_in_the_browser(server: Hub, url: str, action: str) -> str:
    """The person: signs in to the web UI with their token, opens the URL, answers."""
    jar = aiohttp.CookieJar(unsafe=True)  # the hub is on 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as browser:
        form = await (await browser.get(f"{server.url}/login")).text()
        signed_in = await browser.post(f"{server.url}/login", data={"token": ALICE, "csrf_token": csrf_of(form)})
        assert "Signed in as" in await signed_in.text()
        page = await (await browser.get(url)).text()
        assert "asks to sign in to registry" in page and "<strong>alice</strong>" in page
        answered = await browser.post(url, data={"csrf_token": csrf_of(page), "action": action})
        assert answered.status == 200
        return await answered.text()


async def test_npm_login_is_approved_in_the_web_ui(tmp_path: Path, hub: HubFactory) -> None:
    server = await hub(CONFIG)
    registry = f"{server.url}/registries/npm/"
    env = npm_env(tmp_path, registry)
    npm, url = await start_login(registry, env, tmp_path)
    assert url.startswith(server.url + "/login/cli/")
    page = await answer_in_the_browser(server, url, "approve")
    assert "npm is signed in" in page
    out, _ = await asyncio.wait_for(npm.communicate(), 60)
    assert npm.returncode == 0, out.decode(errors="replace")
    assert f"Logged in on {registry}" in out.decode()
    npmrc = await asyncio.to_thread(Path(env["npm_config_userconfig"]).read_text)
    token = re.search(r":_authToken=(bh_\S+)", npmrc).group(1)
    assert token != ALICE  # a new token of alice's, which she can revoke on her own
    assert ok(await asyncio.to_thread(run_npm, ["whoami"], tmp_path, env)).strip() == "alice"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        mine = await (await session.get(f"{server.url}/api/v1/tokens")).json()
    assert [t["description"] for t in mine["tokens"]] == ["npm login from 127.0.0.1"]
    # The login URL was used up: opening it again shows nothing to approve.
    async with aiohttp.ClientSession() as stranger:
        assert (await stranger.get(url, allow_redirects=False)).status == 303  # to sign in, then a 404


async def test_a_refused_npm_login_stops_npm(tmp_path: Path, hub: HubFactory) -> None:
    server = await hub(CONFIG)
    registry = f"{server.url}/registries/npm/"
    env = npm_env(tmp_path, registry)
    npm, url = await start_login(registry, env, tmp_path)
    assert "was not signed in" in await answer_in_the_browser(server, url, "deny")
    out, _ = await asyncio.wait_for(npm.communicate(), 60)
    assert npm.returncode != 0, out.decode(errors="replace")
    assert "_authToken" not in await asyncio.to_thread(Path(env["npm_config_userconfig"]).read_text)
