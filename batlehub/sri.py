"""Subresource Integrity strings (`sha512-<base64>`, the W3C form of a digest that npm metadata,
lockfiles and HTML use), to and from the lowercase hex digests that storage verifies.
"""

from __future__ import annotations

import base64
import binascii

from batlehub.artifacts import VERIFIABLE
from batlehub.errors import BadRequest

_HEX_LENGTH = {"sha512": 128, "sha256": 64, "sha1": 40}


def sri_to_hex(integrity: str, *, strict: bool = False, what: str = "integrity") -> dict[str, str]:
    """SRI (possibly several space-separated, possibly with `?options`) to {algorithm: lowercase
    hex}, for the algorithms storage can verify. Strict: a malformed entry of such an algorithm
    raises `BadRequest` naming the value as `what`; lenient: it is left out."""
    digests: dict[str, str] = {}
    for token in (integrity or "").split():
        algorithm, sep, value = token.partition("-")
        algorithm = algorithm.lower()
        if not sep or algorithm not in VERIFIABLE:
            continue
        try:
            raw = base64.b64decode(value.split("?", 1)[0], validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) * 2 != _HEX_LENGTH[algorithm]:
            if strict:
                raise BadRequest(f"{what} is not a valid SRI string: {token[:40]!r}")
            continue
        digests.setdefault(algorithm, raw.hex())
    return digests


def hex_to_sri(algorithm: str, hex_digest: str) -> str:
    return f"{algorithm}-" + base64.b64encode(bytes.fromhex(hex_digest)).decode()
