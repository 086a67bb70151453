"""Upload bodies as twine sends them, for the PyPI plugin's in-process tests."""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path

import aiohttp
from batlehub_pypi_testing.packages import write_wheel


def wheel_bytes(name: str, version: str, dependencies: tuple[str, ...] = (), payload: bytes = b"") -> tuple[str, bytes]:
    with tempfile.TemporaryDirectory() as scratch:
        path = write_wheel(name, version, Path(scratch), dependencies=dependencies, payload=payload)
        return path.name, path.read_bytes()


def upload_form(
    name: str,
    version: str,
    filename: str,
    data: bytes,
    *,
    filetype: str = "bdist_wheel",
    sha256: str | None = None,
    extra: dict[str, str] | None = None,
) -> aiohttp.FormData:
    """The multipart form of `twine upload` for one file."""
    form = aiohttp.FormData()
    fields = {
        ":action": "file_upload",
        "protocol_version": "1",
        "metadata_version": "2.1",
        "name": name,
        "version": version,
        "filetype": filetype,
        "pyversion": "py3" if filetype == "bdist_wheel" else "source",
        "summary": "a bench package",
        "sha256_digest": sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
        "md5_digest": hashlib.md5(data).hexdigest(),
        **(extra or {}),
    }
    for key, value in fields.items():
        form.add_field(key, value)
    form.add_field("content", data, filename=filename, content_type="application/octet-stream")
    return form


def basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"__token__:{token}".encode()).decode()}
