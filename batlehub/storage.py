"""Helpers every storage backend shares: key validation and streaming digests.

Keys are relative, `/`-separated paths. Anything that could escape the backend's namespace is
refused here, once, so each backend gets the same protection.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from batlehub.errors import IntegrityError, InvalidKey, PayloadTooLarge
from batlehub.interfaces import StoredBlob

MAX_KEY_LENGTH = 1024


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative key; raise `InvalidKey` otherwise.

    Refused: empty keys, absolute paths, `.`/`..` segments, empty segments, backslashes, NUL and
    other control characters, and over-long keys.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("storage key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey("storage key is too long")
    if key.startswith("/") or "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidKey(f"storage key {key!r} is not a safe relative path")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"storage key {key!r} is not a safe relative path")
    return key


def validate_prefix(prefix: str) -> str:
    """Like `validate_key`, but the empty prefix and a trailing `/` are allowed."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/") or "x")
    return prefix


class StreamDigest:
    """Hashes bytes as they stream by (sha512, sha256, sha1) and enforces a size limit."""

    def __init__(self, max_size: int | None = None) -> None:
        self.size = 0
        self.max_size = max_size
        self._sha512 = hashlib.sha512()
        self._sha256 = hashlib.sha256()
        self._sha1 = hashlib.sha1()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.max_size is not None and self.size > self.max_size:
            raise PayloadTooLarge(f"artifact is larger than the limit of {self.max_size} bytes")
        self._sha512.update(chunk)
        self._sha256.update(chunk)
        self._sha1.update(chunk)

    def digests(self) -> dict[str, str]:
        return {
            "sha512": self._sha512.hexdigest(),
            "sha256": self._sha256.hexdigest(),
            "sha1": self._sha1.hexdigest(),
        }

    def check(self, expected: Mapping[str, str] | None) -> None:
        """Raise `IntegrityError` if any expected digest differs from what streamed by."""
        if not expected:
            return
        actual = self.digests()
        for algorithm, want in expected.items():
            if algorithm not in actual:
                raise IntegrityError(f"unsupported digest algorithm {algorithm!r}")
            if actual[algorithm] != want.lower():
                raise IntegrityError(
                    f"integrity check failed: {algorithm} is {actual[algorithm]}, expected {want.lower()}"
                )

    def blob(self, key: str) -> StoredBlob:
        d = self.digests()
        return StoredBlob(key=key, size=self.size, sha512=d["sha512"], sha256=d["sha256"], sha1=d["sha1"])
