"""The worker process for big documents: small inputs stay inline, big ones go to a niced worker,
errors come back as they are, and a worker that dies is replaced."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import pytest

from batlehub.offload import WORKER_NICENESS, Offloader
from batlehub.package_model import Package
from batlehub.packages import PackageRows, package_of


def pid_and_niceness() -> tuple[int, int]:
    return os.getpid(), os.nice(0)


def parse(text: str) -> int:
    return int(text)


@pytest.fixture
def offloader() -> Iterator[Offloader]:
    worker = Offloader(inline_max_bytes=100)
    yield worker
    worker.close()


async def test_small_inputs_run_inline_and_big_ones_in_a_niced_worker(offloader: Offloader) -> None:
    here = os.getpid(), os.nice(0)
    assert await offloader.run(100, pid_and_niceness) == here
    pid, niceness = await offloader.run(101, pid_and_niceness)
    assert pid != os.getpid()
    assert niceness == min(19, here[1] + WORKER_NICENESS)


async def test_errors_come_back_as_raised(offloader: Offloader) -> None:
    with pytest.raises(ValueError, match="invalid literal"):
        await offloader.run(1000, parse, "not a number")
    assert await offloader.run(1000, parse, "42") == 42


async def test_a_dead_worker_is_replaced(offloader: Offloader, caplog: pytest.LogCaptureFixture) -> None:
    pid, _ = await offloader.run(1000, pid_and_niceness)
    os.kill(pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="batlehub.offload"):
        again, _ = await offloader.run(1000, pid_and_niceness)
    assert again != pid
    assert "worker process died" in caplog.text


async def test_a_package_decoded_in_the_worker_is_the_one_decoded_inline(offloader: Offloader) -> None:
    rows = PackageRows(
        name="p",
        package={"revision": 3, "created": 1.5, "modified": 2.5, "extra": '{"readme": "hi"}'},
        versions=[
            {"version": "1.0.0", "manifest": '{"name": "p", "x": [1, 2]}', "created": 1.5, "publisher": "a", "size": 7}
        ],
        files=[
            {"version": "1.0.0", "filename": "p-1.0.0.tgz", "artifact_key": "k", "size": 7, "created": 1.5, "meta": ""}
        ],
        tags=[("latest", "1.0.0")],
        owners=["a"],
    )
    inline = package_of(rows)
    assert isinstance(inline, Package) and inline.stamp == rows.stamp
    assert await offloader.run(rows.size + 1000, package_of, rows) == inline
