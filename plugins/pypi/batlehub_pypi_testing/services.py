"""pypiserver, a real PyPI-style index, as the offline upstream of the PyPI plugin's proxy tests.

pypiserver serves the wheels and sdists of one folder as a PEP 503 HTML index (no PEP 691 JSON,
no `.metadata` files: a plain upstream) and accepts uploads without authentication. It is built
from `batlehub.testing.services`, so a test may stop it (an outage) and it is started again, on
the same port and folder, when the test ends:

    BATLEHUB_TEST_PYPISERVER_URL    http://host:port/ (its /simple/ is the index)

names a running index instead (its fault tests skip then).
"""

from __future__ import annotations

import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from batlehub.testing.services import (
    LOOPBACK,
    ManagedProcess,
    _ChildService,
    _ExternalService,
    _session_service,
    free_port,
    scratch_dir,
    wait_until,
)
from batlehub_pypi_testing.clients import client_env, ok, twine_upload


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class PypiServer(_ChildService):
    """pypiserver on a free port, serving (and storing uploads in) `root/packages`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.packages = root / "packages"
        self.packages.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "pypiserver.log"
        argv = [sys.executable, "-m", "pypiserver", "run", "-i", LOOPBACK, "-p", str(self.port)]
        # Without --disable-fallback an unknown name redirects to a public index: tests stay local.
        argv += ["-a", ".", "-P", ".", "--hash-algo", "sha256", "--disable-fallback", "-v", str(self.packages)]
        self.process = ManagedProcess(argv, self.log, env=client_env(root), cwd=root)

    @property
    def url(self) -> str:
        """The server's base URL, with a trailing slash (uploads go here)."""
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def index_url(self) -> str:
        """The simple index: what a hub's `upstreams` names."""
        return self.url + "simple/"

    def start(self) -> None:
        self.process.start()
        wait_until(lambda: _status(self.index_url) == 200, what="pypiserver", process=self.process, log=self.log)
        self.stopped_by_test = False

    def upload(self, files: Sequence[Path]) -> None:
        """Upload distributions with the real twine (pypiserver asks for no credentials)."""
        with tempfile.TemporaryDirectory(prefix="twine-") as scratch:
            ok(twine_upload(self.url, files, client_env(scratch), None, "-u", "x", "-p", "x"))

    def path_of(self, filename: str) -> Path:
        return self.packages / filename

    def request_count(self, needle: str) -> int:
        """How many logged requests contain `needle` in their path (pypiserver logs with -v)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(1 for line in text.splitlines() if needle in line and "GET" in line)


class _ExternalPypiServer(_ExternalService):
    def __init__(self, url: str) -> None:
        super().__init__(url if url.endswith("/") else url + "/", "BATLEHUB_TEST_PYPISERVER_URL")

    @property
    def index_url(self) -> str:
        return self.url + "simple/"

    def upload(self, files: Sequence[Path]) -> None:
        with tempfile.TemporaryDirectory(prefix="twine-") as scratch:
            ok(twine_upload(self.url, files, client_env(scratch), None, "-u", "x", "-p", "x"))

    def path_of(self, filename: str) -> Path:
        pytest.skip("the files of an external pypiserver cannot be changed")

    def request_count(self, needle: str) -> int:
        pytest.skip("the request log of an external pypiserver is not readable")


@pytest.fixture(scope="session")
def pypiserver() -> Iterator[PypiServer | _ExternalService]:
    """A pypiserver index: `.url`, `.index_url`, `.upload(files)`, `.path_of(filename)`,
    `.stop()`, `.start()`."""
    external = os.environ.get("BATLEHUB_TEST_PYPISERVER_URL")
    if external:
        yield _ExternalPypiServer(external)
        return
    yield from _session_service(lambda: PypiServer(scratch_dir("pypiserver")))
