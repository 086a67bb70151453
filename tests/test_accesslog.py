"""The access log an operator reads: one line per request with method, path, status, time, user
and client IP — from every worker process — and tracing that costs nothing unless configured."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from batlehub.accesslog import StreamAccessLog
from batlehub.config import OtelSettings
from batlehub.testing.services import free_port
from batlehub.tracing import configure_tracing

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO batlehub\.access: "
    r"(?P<method>\S+) (?P<path>\S+) (?P<status>\d{3}) (?P<ms>[\d.]+)ms user=(?P<user>\S+) ip=(?P<ip>\S+)$"
)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_of_one_loop_turn_are_written_together() -> None:
    stream = CountingStream()
    log = StreamAccessLog(stream)
    log.write("GET", "/registries/npm/left-pad", 200, 1.25, None, "10.0.0.7")
    log.write("PUT", "/registries/npm/@acme%2fui", 201, 12.0, "alice", "10.0.0.8")
    assert stream.getvalue() == ""  # not yet: the turn is not over
    await asyncio.sleep(0)
    lines = stream.getvalue().splitlines()
    assert stream.writes == 1 and len(lines) == 2
    first, second = (LINE.match(line) for line in lines)
    assert first and first["path"] == "/registries/npm/left-pad" and first["user"] == "-" and first["ms"] == "1.2"
    assert second and second["method"] == "PUT" and second["status"] == "201" and second["user"] == "alice"
    assert second["ip"] == "10.0.0.8"


def test_without_a_loop_lines_are_written_at_once() -> None:
    stream = CountingStream()
    StreamAccessLog(stream).write("GET", "/x", 404, 0.1, None, "127.0.0.1")
    assert LINE.match(stream.getvalue().strip())


def test_tracing_is_off_without_an_endpoint() -> None:
    assert configure_tracing(OtelSettings(endpoint="")) is False


def test_tracing_without_the_sdk_says_how_to_get_it(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with caplog.at_level(logging.WARNING, logger="batlehub.server"):
        assert configure_tracing(OtelSettings(endpoint="http://127.0.0.1:4317")) is True
    assert "batlehub[otel]" in caplog.text


def test_every_worker_writes_access_lines(tmp_path: Path) -> None:
    """With `server.workers = 2`, requests served by either process appear in the log."""
    port = free_port()
    config = tmp_path / "batlehub.toml"
    config.write_text(f'registries = []\n[server]\nhost = "127.0.0.1"\nport = {port}\nworkers = 2\n')
    log_path = tmp_path / "serve.log"
    env = {"BATLEHUB_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batlehub", "serve", "--config", str(config), "--data-dir", str(tmp_path / "d")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/banner", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        for _ in range(60):  # new connections each time, so the kernel spreads them over both
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/banner", timeout=5).read()
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log_path.read_text()
    # SO_REUSEPORT spreads 60 connections over both workers; a worker that did not log (as the
    # second one once did, at WARNING) leaves lines missing.
    access = [line for line in text.splitlines() if LINE.match(line) and " GET /api/v1/banner 200 " in line]
    assert len(access) >= 61, text[-2000:]
    assert proc.returncode == 0
