"""The incremental JSON reader of request bodies, used by formats whose uploads carry a big
base64 member (npm's publish): values decoded within budgets, the big member streamed out."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Awaitable, Callable

import pytest

from batlehub.errors import BadRequest, PayloadTooLarge
from batlehub.jsonstream import JsonStream


def chunks_of(body: bytes, size: int = 7) -> Callable[[], Awaitable[bytes]]:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]

    async def read() -> bytes:
        return pieces.pop(0) if pieces else b""

    return read


async def read_object(stream: JsonStream) -> tuple[dict[str, object], bytes]:
    """Members as values, except `data`, streamed (as a format would drive the reader)."""
    values: dict[str, object] = {}
    data = b""
    await stream.expect(b"{")
    while True:
        key = await stream.key()
        if key == "data":
            await stream.expect(b'"')
            data = b"".join([piece async for piece in stream.base64_string()])
        else:
            values[key] = await stream.value()
        if not await stream.after_member(b"}"):
            return values, data


async def test_values_decode_and_the_big_member_streams_across_chunk_boundaries() -> None:
    payload = bytes(range(256)) * 2000
    body = json.dumps({"name": 'x"y \\ z', "n": [1, {"a": None}], "data": base64.b64encode(payload).decode()}).encode()
    values, data = await read_object(JsonStream(chunks_of(body), 1000))
    assert values == {"name": 'x"y \\ z', "n": [1, {"a": None}]}
    assert data == payload


async def test_the_budget_counts_what_is_kept_not_the_streamed_member() -> None:
    body = json.dumps({"data": base64.b64encode(b"z" * 100_000).decode(), "readme": "r" * 600}).encode()
    with pytest.raises(PayloadTooLarge, match=re.escape("upload (without the file) is larger than 500 bytes")):
        await read_object(JsonStream(chunks_of(body, 4096), 500, name="upload", streamed="file"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than 64 levels"),
        (b'{"a": [' + b"[]," * 200 + b"[]]}", "more than 100 objects and arrays"),
        (b'{"data": "QUJD@@=="}', "data is not valid base64"),
        (b'{"a": 1', "expected ',' or '}'"),
    ],
)
async def test_hostile_bodies_are_a_clear_400(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        await read_object(JsonStream(chunks_of(body), 1_000_000, max_containers=100))
