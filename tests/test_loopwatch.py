"""The event-loop watch: it sees a real block, and warns about long ones once per interval."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from batlehub.loopwatch import LoopWatch


async def test_a_blocking_call_is_measured() -> None:
    seen: list[float] = []
    watch = LoopWatch(observe=seen.append)
    task = asyncio.create_task(watch.run())
    await asyncio.sleep(0.12)
    time.sleep(0.3)  # noqa: ASYNC251 -- holds the loop on purpose, as a big decode on it would
    await asyncio.sleep(0.12)
    task.cancel()
    assert watch.worst_secs >= 0.25
    assert max(seen) == watch.worst_secs
    assert sorted(seen)[len(seen) // 2] < 0.05  # the other samples are on time


def test_long_blocks_warn_throttled_and_name_the_remedy(caplog: pytest.LogCaptureFixture) -> None:
    watch = LoopWatch(warn_secs=1.0)
    with caplog.at_level(logging.WARNING, logger="batlehub.loopwatch"):
        watch.sample(0.5)
        assert caplog.records == []
        watch.sample(1.5)
        watch.sample(2.5)
        watch.sample(1.2)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "blocked for 1.5 s" in message and "server.workers" in message
    assert watch.worst_secs == 2.5
