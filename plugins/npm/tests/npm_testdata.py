"""Test data for the npm plugin's tests: hub settings with tokens for an admin and two users, and
publish bodies shaped exactly like the ones `npm publish` sends."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from batlehub.config import Settings, parse_settings

ADMIN = "admin-token-0123456789"
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789"


def hub_settings(data_dir: Path, *, registries: list[dict[str, Any]] | None = None, **extra: Any) -> Settings:
    raw: dict[str, Any] = {
        "auth": [
            {
                "type": "token",
                "tokens": [
                    {"value": ADMIN, "role": "admin", "user_id": "admin"},
                    {"value": ALICE, "role": "user", "user_id": "alice"},
                    {"value": BOB, "role": "user", "user_id": "bob"},
                ],
            }
        ],
        "registries": registries
        or [
            {"type": "npm", "name": "npm", "mode": "local"},
            {
                "type": "npm",
                "name": "readonly",
                "mode": "local",
                "rbac": {"user": ["releases:read", "source:read"]},
            },
        ],
        **extra,
    }
    return parse_settings(raw, data_dir=data_dir)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_tarball(name: str, version: str, payload: bytes = b"") -> bytes:
    """A real npm-style tarball: package/package.json (+ a payload file)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in (
            ("package/package.json", json.dumps({"name": name, "version": version}).encode()),
            ("package/payload.bin", payload),
        ):
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def publish_body(
    name: str,
    version: str,
    tarball: bytes | None = None,
    *,
    tags: dict[str, str] | None = None,
    integrity_of: bytes | None = None,
    **manifest: Any,
) -> dict[str, Any]:
    """What `npm publish` sends (same shape and key order as the CLI)."""
    tarball = make_tarball(name, version) if tarball is None else tarball
    checked = tarball if integrity_of is None else integrity_of
    basename = name.rsplit("/", 1)[-1]
    return {
        "_id": name,
        "name": name,
        "description": manifest.get("description", f"test package {name}"),
        "dist-tags": tags if tags is not None else {"latest": version},
        "versions": {
            version: {
                "name": name,
                "version": version,
                "description": f"test package {name}",
                "dependencies": {},
                "readme": f"# {name}",
                "_id": f"{name}@{version}",
                "dist": {
                    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(checked).digest()).decode(),
                    "shasum": hashlib.sha1(checked).hexdigest(),
                    "tarball": f"http://example.invalid/{name}/-/{basename}-{version}.tgz",
                },
                **manifest,
            }
        },
        "access": None,
        "_attachments": {
            f"{name}-{version}.tgz": {
                "content_type": "application/octet-stream",
                "data": base64.b64encode(tarball).decode(),
                "length": len(tarball),
            }
        },
    }
