"""Handing memory back: arenas capped at start unless the operator chose, and a trim after big
work only, from a thread, once per tick however much big work there was."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from batlehub import memory
from batlehub.offload import Offloader

glibc = pytest.mark.skipif(memory._LIBC is None, reason="glibc only")


@glibc
@pytest.mark.parametrize(
    ("env", "made"),
    [
        ({}, "arenas trim_threshold"),
        ({"MALLOC_ARENA_MAX": "4"}, "trim_threshold"),
        ({"MALLOC_ARENA_MAX": "4", "MALLOC_TRIM_THRESHOLD_": "0"}, ""),
    ],
)
def test_malloc_is_tuned_unless_the_operator_chose(env: dict[str, str], made: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from batlehub import memory; print(*memory.tune())"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == made


@glibc
def test_a_real_trim_runs() -> None:
    assert memory.trim() in (True, False)  # the call itself works on this libc


async def test_trims_follow_big_work_only() -> None:
    calls: list[str] = []

    def fake_trim() -> bool:
        calls.append(threading.current_thread().name)
        return True

    trimmer = memory.Trimmer(trim=fake_trim)
    assert await trimmer.tick() is True  # once after start
    calls.clear()
    assert await trimmer.tick() is False  # nothing big happened
    memory.note_big_work(memory.BIG_BYTES - 1)
    assert await trimmer.tick() is False  # small work does not count
    memory.note_big_work(memory.BIG_BYTES)
    memory.note_big_work(10 * memory.BIG_BYTES)
    assert await trimmer.tick() is True
    assert await trimmer.tick() is False  # one trim for all the work since the last tick
    assert len(calls) == 1 and calls[0] != threading.main_thread().name  # never on the event loop
    assert trimmer.trims == 2


async def test_work_sent_to_the_worker_process_counts_as_big() -> None:
    trimmer = memory.Trimmer(trim=lambda: True)
    await trimmer.tick()
    offload = Offloader(inline_max_bytes=10)
    try:
        assert await offload.run(5, len, b"small") == 5
        assert await trimmer.tick() is False
        assert await offload.run(memory.BIG_BYTES, len, b"x" * 11) == 11
        assert await trimmer.tick() is True
    finally:
        offload.close()
