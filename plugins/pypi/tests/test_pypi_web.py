"""The web UI's page of a Python project, in process: what a Python user looks for (summary,
README in each markup, Requires-Python, Requires-Dist by extra, files with sizes and digests,
yanked releases with their reason, pip's commands, owners), for a project published here and for
one proxied from a real upstream index (pypiserver). The browser test (`test_pypi_web_browser`)
shows the same page in Chromium."""

from __future__ import annotations

import hashlib
import html
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from batlehub_pypi.web_page import dependencies, readme_of
from batlehub_pypi_testing.packages import write_wheel
from pypi_testdata import basic, upload_form

from batlehub.app import create_app
from batlehub.config import parse_settings

ALICE = "web-alice-token-0123456789"
EVERY = ["releases:read", "source:read", "releases:publish", "releases:delete"]
RST = """Widgets
=======

A *widget* library.

.. code-block:: python

   import widgets

`a link <javascript:alert(1)>`_ and `docs <https://docs.example/widgets>`_.
"""


def text_of(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def readme_html(page: str) -> str:
    start = page.index('<div class="readme">')
    return page[start : page.index("</section>", start)]


def wheel(name: str, version: str, **kwargs: Any) -> tuple[str, bytes]:
    with tempfile.TemporaryDirectory() as scratch:
        path = write_wheel(name, version, Path(scratch), **kwargs)
        return path.name, path.read_bytes()


async def upload(client: TestClient, name: str, version: str, **kwargs: Any) -> bytes:
    filename, data = wheel(name, version, **kwargs)
    form = upload_form(name, version, filename, data)
    async with client.post("/registries/py/legacy/", data=form, headers=basic(ALICE)) as response:
        assert response.status == 200, await response.text()
    return data


def settings(tmp_path: Path, upstream: str = "http://127.0.0.1:9/simple/") -> Any:
    raw = {
        "auth": [{"type": "token", "tokens": [{"value": ALICE, "role": "user", "user_id": "alice"}]}],
        "registries": [
            {"type": "pypi", "name": "py", "mode": "local", "rbac": {"user": EVERY}},
            {"type": "pypi", "name": "mirror", "mode": "proxy", "upstreams": [upstream]},
        ],
    }
    return parse_settings(raw, data_dir=tmp_path / "data")


@pytest.fixture
async def client(aiohttp_client: Any, tmp_path: Path) -> TestClient:
    return await aiohttp_client(create_app(settings(tmp_path)))  # type: ignore[no-any-return]


async def test_a_local_project_page_says_what_a_python_user_looks_for(client: TestClient) -> None:
    headers = ["Requires-Python: >=3.9", "Description-Content-Type: text/markdown", "License: MIT"]
    headers += ["Provides-Extra: fast", "Project-URL: Source, https://git.example/acme/widgets"]
    deps = ("requests>=2.31", 'uvloop>=0.19; extra == "fast"', 'tomli>=2; python_version < "3.11"')
    await upload(client, "Acme.Widgets", "1.0.0", summary="Widgets for everyone", description="# old")
    data = await upload(
        client,
        "Acme.Widgets",
        "1.1.0",
        summary="Widgets for everyone",
        headers=headers,
        dependencies=deps,
        description="# Acme widgets\n\nUse **them**.\n\n<script>alert(1)</script>",
    )
    await upload(client, "Acme.Widgets", "1.2.0", summary="Broken widgets", description="# broken")
    yank = await client.post(
        "/registries/py/pypi/acme-widgets/1.2.0/yank", json={"reason": "wheel misses a module"}, headers=basic(ALICE)
    )
    assert yank.status == 200

    response = await client.get("/packages/py/acme-widgets")
    assert response.status == 200
    page = await response.text()
    seen = text_of(page)
    # The latest release is the newest that is not yanked.
    assert "Acme.Widgets 1.1.0" in seen and "Widgets for everyone" in seen
    assert "pypi published here" in seen
    assert "pip install Acme.Widgets==1.1.0" in seen
    assert "pip install --index-url http://127.0.0.1:" in seen and "/registries/py/simple/ Acme.Widgets" in seen
    assert "Requires-Python >=3.9" in seen and "License MIT" in seen and "Owners alice" in seen
    assert "Source https://git.example/acme/widgets" in seen and "Extras fast" in seen
    assert 'Needed to install (2) requests >=2.31 tomli >=2; python_version < "3.11"' in seen
    assert "extra fast (1) uvloop >=0.19" in seen
    readme = readme_html(page)
    assert "<h1>Acme widgets</h1>" in readme and "<strong>them</strong>" in readme and "<script" not in readme
    filename = "acme_widgets-1.1.0-py3-none-any.whl"
    assert f"Files of 1.1.0 File Size Notes {filename} 1.2 kB wheel py3, Python >=3.9" in seen
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in seen
    assert f"md5 {hashlib.md5(data).hexdigest()}" in seen
    assert "Versions (3) Version Published Size Tags Status 1.2.0" in seen and "yanked wheel misses a module" in seen

    yanked = text_of(await (await client.get("/packages/py/acme-widgets?version=1.2.0")).text())
    assert "Yanked: wheel misses a module" in yanked and "pip install Acme.Widgets==1.2.0" in yanked
    old = text_of(await (await client.get("/packages/py/Acme_Widgets?version=1.0")).text())
    assert "Acme.Widgets 1.0.0" in old  # names and versions are normalized as pip does

    assert (await client.get("/packages/py/acme-widgets?version=9.9")).status == 404
    assert (await client.get("/packages/py/acme-widgets?version=not a version")).status == 404
    assert (await client.get("/packages/py/no-such-project")).status == 404
    for odd in ("-bad-", "a" * 300, "x%00y", "@scope/name"):
        assert (await client.get(f"/packages/py/{odd}")).status == 400, odd
    assert (await client.get("/packages/py/acme-widgets", params={"version": "9" * 5000})).status == 404
    # A version too long for Python's int conversion is a bad version, not a server error.
    assert (await client.get(f"/registries/py/pypi/acme-widgets/{'9' * 5000}/json")).status == 400

    listing = text_of(await (await client.get("/?q=widgets")).text())
    # The list shows the release pip picks (1.2.0 is yanked) and its summary, and searches that.
    assert "1 package" in listing and "acme-widgets Widgets for everyone 1.1.0 pypi py local" in listing
    assert "No package matches" in text_of(await (await client.get("/?q=broken")).text())
    unyank = await client.post("/registries/py/pypi/acme-widgets/1.2.0/unyank", headers=basic(ALICE))
    assert unyank.status == 200
    listing = text_of(await (await client.get("/?q=broken")).text())
    assert "acme-widgets Broken widgets 1.2.0 pypi py local" in listing
    delete = await client.delete("/registries/py/pypi/acme-widgets/1.2.0/", headers=basic(ALICE))
    assert delete.status == 200
    listing = text_of(await (await client.get("/?q=widgets")).text())
    assert "acme-widgets Widgets for everyone 1.1.0 pypi py local" in listing


def test_rest_is_rendered_by_pypis_renderer_without_raw_html_and_plain_text_stays_text() -> None:
    rendered, markup = readme_of({"description": RST, "description_content_type": "text/x-rst"})
    assert markup == "html" and "<h1>Widgets" in rendered and "<em>widget</em>" in rendered
    assert "alert" not in rendered and "javascript:" not in rendered
    assert 'href="https://docs.example/widgets"' in rendered
    assert readme_of({"description": RST})[1] == "html"  # no content type: reStructuredText, as PyPI
    raw = RST + '\n.. raw:: html\n\n   <script>alert("rst")</script>\n'
    assert readme_of({"description": raw}) == (raw, "text")  # PyPI's renderer refuses raw HTML
    assert readme_of({"description": "Title\n===\n\n.. bogus::", "description_content_type": "text/x-rst"}) == (
        "Title\n===\n\n.. bogus::",
        "text",
    )  # broken reStructuredText is shown as text
    assert readme_of({"description": "*x*", "description_content_type": "text/plain; charset=UTF-8"}) == ("*x*", "text")
    assert readme_of({"description": "# x", "description_content_type": "text/markdown; variant=GFM"})[1] == "markdown"
    assert readme_of({}) == ("", "text")


def test_requires_dist_is_grouped_by_extra() -> None:
    found = dependencies(['pytest>=8; extra == "test"', "attrs", 'cffi; platform_python_implementation == "CPython"'])
    assert [(d.name, d.requirement, d.kind) for d in found] == [
        ("pytest", ">=8", "extra test"),
        ("attrs", "", ""),
        ("cffi", '; platform_python_implementation == "CPython"', ""),
    ]
    assert dependencies(["not a requirement !!"]) == ()


async def test_a_proxied_project_page_shows_the_upstream_files(
    aiohttp_client: Any, tmp_path: Path, pypiserver: Any
) -> None:
    out = tmp_path / "dists"
    first = write_wheel("upstream-thing", "0.1.0", out)
    second = write_wheel("upstream-thing", "0.2.0", out, headers=["Requires-Python: >=3.10"])
    pypiserver.upload([first, second])
    client = await aiohttp_client(create_app(settings(tmp_path, pypiserver.index_url)))
    response = await client.get("/packages/mirror/upstream-thing")
    assert response.status == 200
    seen = text_of(await response.text())
    assert "upstream-thing 0.2.0" in seen and "proxied from upstream" in seen
    assert "No metadata file of this release could be had" in seen  # pypiserver offers none
    assert "pip install upstream-thing==0.2.0" in seen and "Versions (2)" in seen
    assert f"sha256 {hashlib.sha256(second.read_bytes()).hexdigest()}" in seen
    assert (
        "/registries/mirror/files/upstream-thing/upstream_thing-0.2.0-py3-none-any.whl"
        in await (await client.get("/packages/mirror/upstream-thing")).text()
    )
    old = text_of(await (await client.get("/packages/mirror/upstream-thing?version=0.1.0")).text())
    assert "upstream-thing 0.1.0" in old
    assert (await client.get("/packages/mirror/upstream-thing?version=3.0")).status == 404
    assert (await client.get("/packages/mirror/no-such-thing")).status == 404


async def test_a_big_rest_readme_is_rendered_off_the_event_loop(client: TestClient) -> None:
    paragraphs = "".join(
        f"Section {i}\n{'-' * (8 + len(str(i)))}\n\nText of *section* {i}. {'word ' * 50}\n\n" for i in range(1000)
    )
    description = "Big project\n===========\n\n" + paragraphs
    assert len(description) > 256 * 1024  # past what core renders inline: a worker process does it
    await upload(client, "big-rest", "1.0", description=description)
    response = await client.get("/packages/py/big-rest")
    assert response.status == 200
    readme = readme_html(await response.text())
    assert "Big project" in readme and "<em>section</em> 999" in readme


async def test_a_proxied_page_reads_the_metadata_file_the_upstream_offers(aiohttp_client: Any, tmp_path: Path) -> None:
    # The upstream is another hub: its pages announce each wheel's core metadata with a digest.
    upstream = await aiohttp_client(create_app(settings(tmp_path / "upstream")))
    headers = ["Description-Content-Type: text/markdown", "Requires-Python: >=3.10", "License: BSD"]
    readme = "# Chained\n\nFrom **upstream**.\n\n<script>alert(1)</script><img src=x onerror=alert(2)>"
    await upload(
        upstream, "chained", "2.0", summary="Proxied summary", headers=headers, dependencies=("attrs>=23",),
        description=readme,
    )  # fmt: skip
    index = str(upstream.make_url("/registries/py/simple/"))
    proxy = await aiohttp_client(create_app(settings(tmp_path / "proxy", index)))
    response = await proxy.get("/packages/mirror/chained")
    assert response.status == 200
    page = await response.text()
    seen = text_of(page)
    assert "chained 2.0" in seen and "proxied from upstream" in seen and "Proxied summary" in seen
    assert "Requires-Python >=3.10" in seen and "License BSD" in seen and "attrs >=23" in seen
    assert "No metadata file" not in seen
    html_readme = readme_html(page)
    assert "<strong>upstream</strong>" in html_readme and "<script" not in html_readme
    assert "onerror" not in html_readme
    again = await proxy.get("/packages/mirror/chained")  # remembered: the same page
    assert text_of(await again.text()) == seen
