"""The digests npm metadata announces for a tarball: `dist.integrity` (Subresource Integrity,
`sha512-<base64>`, read by core's `sri_to_hex`) and `dist.shasum` (hex sha1), as lowercase hex
for storage to verify.

Publishes are checked strictly (a malformed value is the client's mistake: 400). Upstream metadata
is read leniently (a malformed entry is left out; the tarball then fails verification or is
refused for having nothing to verify against, never stored unchecked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from batlehub.api import BadRequest, IntegrityError, sri_to_hex

_SHASUM = re.compile(r"^[0-9a-fA-F]{40}$")


def expected_digests(dist: Any, *, strict: bool) -> dict[str, str]:
    """The hex digests a manifest's `dist` announces, checked for agreement with each other.

    Strict (publishes): a `dist` that is not an object or malformed values are a 400. Both modes:
    `integrity` and `shasum` announcing two different sha1 digests raise (400 for a publish,
    `IntegrityError` for upstream metadata)."""
    if dist is None:
        return {}
    if not isinstance(dist, Mapping):
        if strict:
            raise BadRequest("manifest field dist must be an object")
        return {}
    integrity = dist.get("integrity")
    if integrity is not None and not isinstance(integrity, str):
        if strict:
            raise BadRequest("dist.integrity must be a string")
        integrity = None
    expected = sri_to_hex(integrity or "", strict=strict, what="dist.integrity")
    shasum = dist.get("shasum")
    if shasum is not None:
        if not isinstance(shasum, str) or not _SHASUM.match(shasum):
            if strict:
                raise BadRequest("dist.shasum must be 40 hex digits")
            return expected
        if expected.setdefault("sha1", shasum.lower()) != shasum.lower():
            if strict:
                raise BadRequest("dist.shasum and dist.integrity disagree")
            raise IntegrityError("the metadata announces two different sha1 digests")
    return expected
