"""A small Python package index for policy tests: PEP 691 JSON project pages whose files carry the
`upload-time` a test chooses (or none), with real wheels and their PEP 658 `.metadata` files, so a
client can install what the hub lets through. A client that does not accept JSON gets the PEP 503
HTML form (which has no upload times)."""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from batlehub_pypi_testing.packages import module_name, write_wheel

HOUR = 3600.0
DAY = 86400.0
JSON_V1 = "application/vnd.pypi.simple.v1+json"


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PolicyIndex:
    """The index's projects and what it was asked (`requests`: paths)."""

    def __init__(self) -> None:
        self.projects: dict[str, dict[str, float | None]] = {}
        """Project -> version -> upload time of its wheel (None: the page gives no time)."""
        self.requests: list[str] = []
        self.url = ""
        self.html_only = False
        """Answer with PEP 503 HTML whatever the client accepts (as pypiserver does)."""
        self._wheels: dict[tuple[str, str], tuple[str, bytes]] = {}

    def add(self, project: str, versions: dict[str, float | None]) -> None:
        self.projects[project] = dict(versions)

    def wheel(self, project: str, version: str) -> tuple[str, bytes]:
        """The wheel's name and bytes, the same every time (zip entries carry the time of writing)."""
        key = (project, version)
        if key not in self._wheels:
            with tempfile.TemporaryDirectory() as scratch:
                path = write_wheel(project, version, Path(scratch))
                self._wheels[key] = (path.name, path.read_bytes())
        return self._wheels[key]

    def metadata(self, project: str, version: str) -> bytes:
        _, data = self.wheel(project, version)
        with zipfile.ZipFile(BytesIO(data)) as archive:
            return archive.read(f"{module_name(project)}-{version}.dist-info/METADATA")

    def file_requests(self, filename: str) -> int:
        return sum(1 for path in self.requests if path.startswith("/files/") and filename in path)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/simple/{project}/", self.page)
        app.router.add_get("/files/{filename}", self.file)
        return app

    def _files(self, project: str) -> list[dict[str, Any]]:
        files = []
        for version, uploaded in self.projects[project].items():
            filename, data = self.wheel(project, version)
            item: dict[str, Any] = {
                "filename": filename,
                "url": f"../../files/{filename}",
                "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                "core-metadata": {"sha256": hashlib.sha256(self.metadata(project, version)).hexdigest()},
                "size": len(data),
            }
            if uploaded is not None:
                item["upload-time"] = iso(uploaded)
            files.append(item)
        return files

    async def page(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        project = request.match_info["project"]
        if project not in self.projects:
            raise web.HTTPNotFound()
        files = self._files(project)
        if JSON_V1 in request.headers.get("Accept", "") and not self.html_only:
            doc = {"meta": {"api-version": "1.1"}, "name": project, "versions": list(self.projects[project])}
            return web.json_response({**doc, "files": files}, content_type=JSON_V1)
        links = "".join(
            f'<a href="{f["url"]}#sha256={f["hashes"]["sha256"]}"'
            f' data-core-metadata="sha256={f["core-metadata"]["sha256"]}">{f["filename"]}</a>\n'
            for f in files
        )
        return web.Response(text=f"<!DOCTYPE html><html><body>\n{links}</body></html>", content_type="text/html")

    async def file(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        filename = request.match_info["filename"]
        metadata = filename.endswith(".metadata")
        wanted = filename.removesuffix(".metadata")
        for project, versions in self.projects.items():
            for version in versions:
                name, data = self.wheel(project, version)
                if name == wanted:
                    body = self.metadata(project, version) if metadata else data
                    return web.Response(body=body, content_type="application/octet-stream")
        raise web.HTTPNotFound()


@asynccontextmanager
async def running_index() -> AsyncIterator[PolicyIndex]:
    """A `PolicyIndex` listening on loopback (its `url` is the simple index's URL) for the block."""
    index = PolicyIndex()
    server = TestServer(index.app(), host="127.0.0.1")
    await server.start_server()
    index.url = str(server.make_url("/simple/"))
    try:
        yield index
    finally:
        await server.close()
