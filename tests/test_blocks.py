"""The in-memory IP block list: what the guard checks instead of asking the cache per request."""

from __future__ import annotations

import logging
import time

import pytest

from batlehub.blocks import BlockList
from batlehub.builtin.cache_memory import MemoryCache
from batlehub.interfaces import IpBlock


def block(ip: str, secs: float = 60) -> IpBlock:
    return IpBlock(ip=ip, reason="test", expires_at=time.time() + secs, created_at=time.time())


async def test_the_list_follows_the_cache_backend_on_refresh() -> None:
    cache = MemoryCache()
    blocks = BlockList(cache)
    await cache.block_ip(block("192.0.2.1"))
    assert blocks.get("192.0.2.1") is None  # another replica's block: seen at the next refresh
    await blocks.refresh()
    assert blocks.get("192.0.2.1") is not None
    await cache.unblock_ip("192.0.2.1")
    await blocks.refresh()
    assert blocks.get("192.0.2.1") is None


async def test_own_changes_hold_at_once_and_expired_blocks_never() -> None:
    blocks = BlockList(MemoryCache())
    blocks.put(block("192.0.2.2"))
    blocks.put(block("192.0.2.3", secs=-1))
    assert blocks.get("192.0.2.2") is not None and blocks.get("192.0.2.3") is None
    blocks.drop("192.0.2.2")
    assert blocks.get("192.0.2.2") is None


class Down(MemoryCache):
    async def list_blocks(self) -> list[IpBlock]:
        raise ConnectionError("cache backend down")


async def test_a_cache_outage_keeps_the_last_list_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    cache = Down()
    blocks = BlockList(cache)
    blocks.put(block("192.0.2.4"))
    with caplog.at_level(logging.WARNING, logger="batlehub.blocks"):
        for _ in range(3):
            await blocks.refresh()
    assert blocks.get("192.0.2.4") is not None
    assert len(caplog.records) == 1 and "keeping the last list" in caplog.text
