"""`S3Storage`: the `StorageBackend` Protocol on an S3-compatible object store (aioboto3).

Memory per upload is bounded by one part (plus the chunk in flight): bytes are hashed as they
stream in, buffered up to `part_size`, and either sent as one `PutObject` (small objects, checked
against `expected` before anything is sent) or as parts of a multipart upload that is aborted on
any failure — a refused size, a digest mismatch found after the last byte, a broken source, a
cancelled request — so no object ever appears under a key unless every byte was right.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from batlehub.errors import NotFound, ServiceUnavailable, UpstreamError
from batlehub.interfaces import BlobStat, StoredBlob
from batlehub.storage import StreamDigest, validate_key, validate_prefix
from batlehub_storage_s3.options import S3Options

__all__ = ["S3Options", "S3Storage"]

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
"""Bytes per chunk handed to the caller of `get`."""

_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"})


class S3Storage:
    """A `StorageBackend` on one bucket (and optional key prefix) of an S3-compatible service."""

    def __init__(self, options: S3Options) -> None:
        self.options = options
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the one client this backend uses for its whole life (connection pool included).

        Nothing is contacted here, so the hub starts even while S3 is down; `ping` (the health
        check) reports that instead.
        """
        o = self.options
        session = aioboto3.Session(
            aws_access_key_id=o.access_key_id,
            aws_secret_access_key=o.secret_access_key,
            region_name=o.region,
        )
        config = Config(
            s3={"addressing_style": "path" if o.force_path_style else "auto"},
            signature_version="s3v4",
            # Few, quick retries: a caller waiting on a download should hear "unavailable" in
            # seconds, not after botocore's default backoff schedule.
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.client("s3", endpoint_url=o.endpoint or None, config=config)
        )
        self._stack = stack

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

    async def ping(self) -> None:
        """`HeadBucket`: proves the endpoint answers, the credentials work and the bucket exists."""
        with self._errors("ping"):
            try:
                await self._client.head_bucket(Bucket=self.options.bucket)
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                    raise ServiceUnavailable(
                        f"storage unavailable: bucket {self.options.bucket!r} does not exist (check storage.bucket)"
                    ) from exc
                raise

    # --- keys -----------------------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        return self.options.prefix + validate_key(key)

    # --- writes ---------------------------------------------------------------------------------

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
        expected: Mapping[str, str] | None = None,
    ) -> StoredBlob:
        object_key = self._object_key(key)
        digest = StreamDigest(max_size)
        buffer = bytearray()
        upload: _MultipartUpload | None = None
        part_size = self.options.part_size
        try:
            async for chunk in chunks:
                digest.update(chunk)  # raises PayloadTooLarge as soon as the limit is passed
                buffer += chunk
                if upload is None and len(buffer) > self.options.multipart_threshold_bytes:
                    upload = _MultipartUpload(self, object_key)
                    await upload.start()
                while upload is not None and len(buffer) >= part_size:
                    with memoryview(buffer) as view:
                        part = bytes(view[:part_size])
                    del buffer[:part_size]
                    await upload.send(part)
                    del part
            # Digests are complete only now; a mismatch aborts the multipart upload below,
            # and a small object has not been sent at all yet.
            digest.check(expected)
            if upload is None:
                with self._errors("put", key):
                    await self._client.put_object(
                        Bucket=self.options.bucket,
                        Key=object_key,
                        Body=bytes(buffer),
                        ContentType="application/octet-stream",
                    )
            else:
                if buffer or not upload.parts:
                    await upload.send(bytes(buffer))
                buffer = bytearray()
                await upload.complete()
        except BaseException:
            if upload is not None and not upload.completed:
                # Shielded so that a cancelled request still cleans up (an unfinished multipart
                # upload costs storage until a lifecycle rule removes it).
                await asyncio.shield(upload.abort())
            raise
        return digest.blob(key)

    async def delete(self, key: str) -> bool:
        """S3 deletes are idempotent and say nothing about existence, so ask first."""
        object_key = self._object_key(key)
        if await self.stat(key) is None:
            return False
        with self._errors("delete", key):
            await self._client.delete_object(Bucket=self.options.bucket, Key=object_key)
        return True

    # --- reads ----------------------------------------------------------------------------------

    def get(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        object_key = self._object_key(key)
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise ValueError("byte range offsets must not be negative")
        return self._read(key, object_key, start, end)

    async def _read(self, key: str, object_key: str, start: int | None, end: int | None) -> AsyncIterator[bytes]:
        first = start or 0
        if end is not None and end <= first:
            # S3 cannot express an empty range; the object must still exist.
            if await self.stat(key) is None:
                raise NotFound(f"no stored object {key!r}")
            return
        request: dict[str, Any] = {"Bucket": self.options.bucket, "Key": object_key}
        if first or end is not None:
            request["Range"] = f"bytes={first}-{'' if end is None else end - 1}"
        with self._errors("get", key):
            try:
                response = await self._client.get_object(**request)
            except ClientError as exc:
                if _code(exc) != "InvalidRange":
                    raise
                # The range starts at or after the end: empty, if the object exists at all.
                response = None
        if response is None:
            if await self.stat(key) is None:
                raise NotFound(f"no stored object {key!r}")
            return
        body = response["Body"]
        async with body:  # releases the connection even if the caller stops reading early
            while True:
                with self._errors("get", key):
                    chunk = await body.read(READ_CHUNK)
                if not chunk:
                    break
                yield chunk

    async def stat(self, key: str) -> BlobStat | None:
        object_key = self._object_key(key)
        with self._errors("stat", key):
            try:
                head = await self._client.head_object(Bucket=self.options.bucket, Key=object_key)
            except ClientError as exc:
                if _code(exc) in _MISSING_CODES:
                    return None
                raise
        return BlobStat(key=key, size=int(head["ContentLength"]), modified=head["LastModified"].timestamp())

    async def list(self, prefix: str = "") -> AsyncIterator[BlobStat]:
        validate_prefix(prefix)
        strip = len(self.options.prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.options.bucket, Prefix=self.options.prefix + prefix).__aiter__()
        while True:
            with self._errors("list", prefix):
                try:
                    page = await pages.__anext__()
                except StopAsyncIteration:
                    return
            for item in page.get("Contents", ()):
                if item["Key"].endswith("/"):  # a "folder" marker some tools create, not an object
                    continue
                yield BlobStat(
                    key=item["Key"][strip:], size=int(item["Size"]), modified=item["LastModified"].timestamp()
                )

    # --- capabilities ---------------------------------------------------------------------------

    def local_path(self, key: str) -> Path | None:
        validate_key(key)
        return None

    async def presigned_url(self, key: str, expires_secs: int = 300) -> str | None:
        """A presigned GET, only when `redirect_downloads` is on (clients must be able to reach S3)."""
        object_key = self._object_key(key)
        if not self.options.redirect_downloads:
            return None
        with self._errors("presign", key):
            url: str = await self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.options.bucket, "Key": object_key},
                ExpiresIn=int(expires_secs),
            )
        return url

    # --- error mapping --------------------------------------------------------------------------

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn boto/aiohttp failures into domain errors; wraps S3 calls only, never the caller's
        chunk source, whose own exceptions must reach the caller unchanged."""
        where = f"{action} {key!r}" if key is not None else action
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = exc.response.get("Error", {}).get("Message") or code
            if code == "NoSuchBucket":
                raise ServiceUnavailable(
                    f"storage unavailable: bucket {self.options.bucket!r} does not exist (check storage.bucket)"
                ) from exc
            if status >= 500 or code in _UNAVAILABLE_CODES:
                raise ServiceUnavailable(f"storage unavailable: {where}: {code} {message}") from exc
            if code in _MISSING_CODES:
                raise NotFound(f"no stored object {key!r}") from exc
            if code in _DENIED_CODES:
                raise UpstreamError(
                    f"storage refused {where}: {code} (check storage.access_key_id, storage.secret_access_key "
                    f"and the bucket policy)"
                ) from exc
            raise UpstreamError(f"storage error: {where}: {code} {message}") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ServiceUnavailable(
                "storage unavailable: no S3 credentials (set storage.access_key_id and "
                "storage.secret_access_key, or provide them through the AWS credential chain)"
            ) from exc
        except (BotoConnectionError, HTTPClientError, aiohttp.ClientError, OSError) as exc:
            # Includes timeouts (TimeoutError is an OSError) and bodies cut off mid-stream.
            raise ServiceUnavailable(f"storage unavailable: {where}: {exc}") from exc
        except BotoCoreError as exc:
            raise UpstreamError(f"storage error: {where}: {exc}") from exc


class _MultipartUpload:
    """One multipart upload in progress; knows how to finish it or throw it away."""

    def __init__(self, storage: S3Storage, object_key: str) -> None:
        self.storage = storage
        self.object_key = object_key
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.completed = False

    async def start(self) -> None:
        s = self.storage
        with s._errors("put", self.object_key):
            response = await s._client.create_multipart_upload(
                Bucket=s.options.bucket, Key=self.object_key, ContentType="application/octet-stream"
            )
        self.upload_id = response["UploadId"]

    async def send(self, data: bytes) -> None:
        s = self.storage
        number = len(self.parts) + 1
        with s._errors("put", self.object_key):
            response = await s._client.upload_part(
                Bucket=s.options.bucket, Key=self.object_key, UploadId=self.upload_id, PartNumber=number, Body=data
            )
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})

    async def complete(self) -> None:
        s = self.storage
        with s._errors("put", self.object_key):
            await s._client.complete_multipart_upload(
                Bucket=s.options.bucket,
                Key=self.object_key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
            )
        self.completed = True

    async def abort(self) -> None:
        """Best effort: the original error matters more than a failed clean-up, which we log."""
        if self.upload_id is None:
            return
        s = self.storage
        try:
            await s._client.abort_multipart_upload(
                Bucket=s.options.bucket, Key=self.object_key, UploadId=self.upload_id
            )
        except Exception:
            log.warning(
                "could not abort multipart upload %s of %r; a bucket lifecycle rule for incomplete "
                "multipart uploads will remove it",
                self.upload_id,
                self.object_key,
                exc_info=True,
            )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
