"""An incremental JSON reader for request bodies too big to hold: everything but the big strings
is decoded with the json module (within a byte budget and a container budget, since a few megabytes
of `[],` become millions of Python lists), and a base64 string member can be streamed out, decoded
chunk by chunk, while it arrives. npm's publish body (a tarball inside as base64) is read with it.

The format drives the reader member by member (`expect`, `key`, `value`, `after_member`,
`members`, `base64_string`), so it decides which member is streamed and what the rest must look like.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from batlehub.errors import BadRequest, PayloadTooLarge
from batlehub.jsondoc import MAX_DEPTH

MAX_CONTAINERS = 100_000
"""Objects and arrays a document may hold. Bytes alone do not bound memory: a few megabytes of
`[],` become millions of Python lists."""

_WS = b" \t\r\n"
_STRING_SPECIAL = re.compile(rb'["\\]')
_STRUCTURE = re.compile(rb'["{}\[\]]')
_SCALAR_END = re.compile(rb"[,}\]\s]")
_DECODE_BATCH = 256 * 1024  # base64 characters decoded at once

ReadChunk = Callable[[], Awaitable[bytes]]


class JsonStream:
    """A byte buffer over an async chunk source (`read()` returns b"" at the end), with a budget
    for the bytes kept as decoded values. `name` names the document in errors, `streamed` the
    streamed string's contents."""

    def __init__(
        self,
        read: ReadChunk,
        max_document_bytes: int,
        *,
        name: str = "document",
        streamed: str = "data",
        max_containers: int = MAX_CONTAINERS,
    ) -> None:
        self._read = read
        self.name = name
        self.streamed = streamed
        self.max_containers = max_containers
        self.buf = bytearray()
        self.pos = 0
        self.eof = False
        self.document_bytes = 0
        self.max_document_bytes = max_document_bytes
        self.containers = 0

    def malformed(self, detail: str) -> BadRequest:
        return BadRequest(f"malformed {self.name}: {detail}")

    async def fill(self) -> bool:
        """Append the next chunk; False at the end of the body. Never moves existing bytes."""
        if self.eof:
            return False
        chunk = await self._read()
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def compact(self) -> None:
        """Drop consumed bytes; only called where no caller holds an index into the buffer."""
        if self.pos > 65536 and self.pos > len(self.buf) // 2:
            del self.buf[: self.pos]
            self.pos = 0

    async def peek(self) -> int | None:
        """The next non-whitespace byte (not consumed), or None at the end of the body."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not await self.fill():
                return None

    async def expect(self, char: bytes) -> None:
        found = await self.peek()
        if found != char[0]:
            got = "end of body" if found is None else repr(chr(found))
            raise self.malformed(f"expected {char.decode()!r}, found {got}")
        self.pos += 1

    async def value(self) -> Any:
        """Read one complete JSON value and decode it with the json module.

        The end of the value is found with a resumable scan (strings, escapes, bracket depth), so
        a value that arrives over many chunks is scanned once, not once per chunk.
        """
        first = await self.peek()
        if first is None:
            raise self.malformed("unexpected end of body")
        self.compact()
        start = self.pos
        scalar = first not in b'{["'
        in_string = first == ord('"')
        depth = 0 if in_string else 1
        scan = start + 1
        end: int | None = None
        while end is None:
            if scalar:
                match = _SCALAR_END.search(self.buf, start)
                if match is not None:
                    end = match.start()
                    break
            else:
                while True:
                    if in_string:
                        match = _STRING_SPECIAL.search(self.buf, scan)
                        if match is None:
                            scan = len(self.buf)
                            break
                        if match.group() == b"\\":
                            if match.end() >= len(self.buf):
                                scan = match.start()  # the escaped byte has not arrived yet
                                break
                            scan = match.end() + 1
                            continue
                        in_string = False
                        scan = match.end()
                        if depth == 0:
                            end = scan
                            break
                    else:
                        match = _STRUCTURE.search(self.buf, scan)
                        if match is None:
                            scan = len(self.buf)
                            break
                        scan = match.end()
                        token = match.group()
                        if token == b'"':
                            in_string = True
                        elif token in (b"{", b"["):
                            depth += 1
                            self.containers += 1
                            if depth > MAX_DEPTH:
                                raise self.malformed(f"nested more than {MAX_DEPTH} levels deep")
                            if self.containers > self.max_containers:
                                raise self.malformed(f"more than {self.max_containers} objects and arrays")
                        else:
                            depth -= 1
                            if depth == 0:
                                end = scan
                                break
                if end is not None:
                    break
            self._count(0, pending=len(self.buf) - start)
            if not await self.fill():
                if scalar:
                    end = len(self.buf)
                    break
                raise self.malformed("unexpected end of body")
        raw = bytes(self.buf[start:end])
        self.pos = end
        self._count(len(raw))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise self.malformed(str(exc).split(":")[0]) from None
        except RecursionError:  # the scan bounds nesting; this is the last line of defence
            raise self.malformed(f"nested more than {MAX_DEPTH} levels deep") from None

    def _count(self, size: int, pending: int = 0) -> None:
        self.document_bytes += size
        if self.document_bytes + pending > self.max_document_bytes:
            raise PayloadTooLarge(
                f"{self.name} (without the {self.streamed}) is larger than {self.max_document_bytes} bytes"
            )

    async def key(self) -> str:
        if await self.peek() != ord('"'):
            raise self.malformed("expected an object key")
        key = await self.value()
        await self.expect(b":")
        return str(key)

    async def after_member(self, closing: bytes) -> bool:
        """After a member: True if another follows (`,`), False at the closing bracket."""
        found = await self.peek()
        if found == ord(","):
            self.pos += 1
            return True
        if found == closing[0]:
            self.pos += 1
            return False
        raise self.malformed(f"expected ',' or {closing.decode()!r}")

    async def members(self) -> AsyncIterator[str]:
        """The keys of the object that starts here, one by one. The caller reads each member's
        value (`value`, `base64_string`, or a nested `members`) before it asks for the next key."""
        await self.expect(b"{")
        if await self.peek() == ord("}"):
            self.pos += 1
            return
        while True:
            yield await self.key()
            if not await self.after_member(b"}"):
                return

    async def base64_string(self) -> AsyncIterator[bytes]:
        """The decoded bytes of a base64 JSON string whose opening quote was just consumed."""
        pending = bytearray()
        padded = False

        def decode(final: bool) -> bytes:
            nonlocal padded
            usable = len(pending) if final else len(pending) - len(pending) % 4
            if not usable:
                return b""
            if padded:
                raise BadRequest(f"{self.streamed} is not valid base64: data after padding")
            piece = bytes(pending[:usable])
            del pending[:usable]
            if final and len(piece) % 4:
                raise BadRequest(f"{self.streamed} is not valid base64: truncated")
            try:
                out = binascii.a2b_base64(piece, strict_mode=True)
            except binascii.Error as exc:
                raise BadRequest(f"{self.streamed} is not valid base64: {exc}") from None
            padded = piece.endswith(b"=")
            return out

        while True:
            match = _STRING_SPECIAL.search(self.buf, self.pos)
            stop = match.start() if match else len(self.buf)
            pending += self.buf[self.pos : stop]
            self.pos = stop
            if match is not None and match.group() == b'"':
                self.pos += 1
                tail = decode(final=True)
                if tail:
                    yield tail
                return
            if match is not None:  # a backslash escape inside base64: only "\/" and line breaks make sense
                if self.pos + 1 >= len(self.buf):
                    if not await self.fill():
                        raise self.malformed(f"unexpected end of body inside {self.streamed}")
                    continue
                escaped = self.buf[self.pos + 1]
                if escaped == ord("/"):
                    pending += b"/"
                elif escaped not in b"nr":
                    raise BadRequest(f"{self.streamed} is not valid base64")
                self.pos += 2
            if len(pending) >= _DECODE_BATCH:
                out = decode(final=False)
                if out:
                    yield out
            if match is None:
                self.compact()
                if not await self.fill():
                    raise self.malformed(f"unexpected end of body inside {self.streamed}")
