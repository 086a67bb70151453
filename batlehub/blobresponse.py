"""A lean response for a whole stored file, sent with `sendfile`.

`aiohttp.web.FileResponse` is general: it hops to the thread pool to look for `.gz`/`.br`
siblings, to stat and open the file, and again to close it. For a tarball download that is most of
the server's time, and the blobs here are never pre-compressed siblings. This response is for the
common case only: a plain `GET`/`HEAD` of the whole object, no `Range`, no conditional headers.
The caller opens the file in the event loop (a page-cached local file opens in microseconds, less
than one thread hand-off) and keeps `FileResponse` for everything else.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Mapping
from email.utils import formatdate
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

_NEEDS_FILE_RESPONSE = ("Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")
CHUNK_SIZE = 256 * 1024


def plain_download(request: web.Request) -> bool:
    """True when the request asks for the whole object unconditionally (what package managers
    send); Range and conditional requests are left to `web.FileResponse`."""
    headers = request.headers
    return not any(name in headers for name in _NEEDS_FILE_RESPONSE)


def open_blob(path: Path, headers: Mapping[str, str]) -> BlobResponse:
    """Open `path` now and return the response that will send it. Raises `OSError` (usually
    `FileNotFoundError`) when the file cannot be opened, before anything is sent."""
    fobj = open(path, "rb", buffering=0)  # closed by the response, or below
    try:
        st = os.fstat(fobj.fileno())
        return BlobResponse(fobj, st, headers)
    except BaseException:
        fobj.close()
        raise


class BlobResponse(web.StreamResponse):
    """200 with the whole open file; the same `ETag` and `Last-Modified` as `FileResponse`, so
    a client's later conditional request (served by `FileResponse`) matches."""

    def __init__(self, fobj: io.FileIO, st: os.stat_result, headers: Mapping[str, str]) -> None:
        super().__init__(headers=headers)
        self._fobj = fobj
        self._size = st.st_size
        self.content_length = st.st_size
        self.headers["ETag"] = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        self.headers["Last-Modified"] = formatdate(st.st_mtime, usegmt=True)
        self.headers["Accept-Ranges"] = "bytes"

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        try:
            writer = await super().prepare(request)
            if request.method != "HEAD" and self._size:
                await self._send(request, writer)
            await super().write_eof()
            return writer
        finally:
            self._fobj.close()

    async def _send(self, request: web.BaseRequest, writer: AbstractStreamWriter | None) -> None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        try:
            # asyncio falls back to reads in the thread pool itself where the transport cannot
            # sendfile (TLS); NotImplementedError comes from loops without sendfile at all.
            await asyncio.get_running_loop().sendfile(transport, self._fobj, 0, self._size)
            return
        except NotImplementedError:
            pass
        assert writer is not None
        self._fobj.seek(0)
        remaining = self._size
        while remaining > 0:
            chunk = await asyncio.to_thread(self._fobj.read, min(CHUNK_SIZE, remaining))
            if not chunk:
                raise ConnectionResetError("the file shrank while it was being sent")
            remaining -= len(chunk)
            await writer.write(chunk)
