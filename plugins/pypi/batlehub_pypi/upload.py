"""The legacy upload API that `twine upload` and `uv publish` speak: a multipart form with
`:action=file_upload`, the release's metadata fields, the digests and the file as `content`.

The file streams into a spool file while md5 and blake2b are computed beside core's digests (never
held in memory); the metadata fields are bounded by `limits.max_document_bytes`. Then every check
runs before anything is stored: the digests the client announced, the file name against the
project and version (wheel and sdist naming rules), the metadata against the core metadata
specification, and for a wheel, its own `METADATA` (read from the spooled file in a thread)
against the file name. The wheel's `METADATA` is what the release's metadata and `.metadata`
file are made of, since that is what installers would read from the wheel itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from packaging.metadata import InvalidMetadata, Metadata, RawMetadata, parse_email

from batlehub.api import (
    ArtifactStore,
    BadRequest,
    IntegrityError,
    PayloadTooLarge,
    RequestTimeout,
    SpooledBlob,
)
from batlehub_pypi.names import DistFile, check_filename, normalize_name, normalize_version

MAX_CORE_METADATA_BYTES = 16 * 1024 * 1024
"""A wheel's METADATA holds the long description too; anything past this is not metadata."""
CHUNK_SIZE = 256 * 1024

_SINGLE = (
    "metadata_version",
    "name",
    "version",
    "summary",
    "description",
    "description_content_type",
    "home_page",
    "download_url",
    "author",
    "author_email",
    "maintainer",
    "maintainer_email",
    "license",
    "license_expression",
    "requires_python",
)
_MULTI = {
    "classifiers": "classifiers",
    "requires_dist": "requires_dist",
    "provides_extra": "provides_extra",
    "provides_dist": "provides_dist",
    "obsoletes_dist": "obsoletes_dist",
    "requires_external": "requires_external",
    "dynamic": "dynamic",
    "license_file": "license_files",
    "platform": "platforms",
    "supported_platform": "supported_platforms",
}
JSON_FIELDS = (
    "summary",
    "description",
    "description_content_type",
    "home_page",
    "download_url",
    "author",
    "author_email",
    "maintainer",
    "maintainer_email",
    "license",
    "license_expression",
    "keywords",
    "classifiers",
    "platforms",
    "requires_dist",
    "requires_python",
    "provides_extra",
    "project_urls",
    "dynamic",
)
"""The metadata a release keeps (what the JSON API shows)."""


@dataclass
class UploadForm:
    """The parsed form: its fields, and the file spooled with every digest known."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    filename: str = ""
    spooled: SpooledBlob | None = None
    md5: str = ""
    blake2b_256: str = ""

    def one(self, key: str) -> str:
        values = self.fields.get(key) or [""]
        return values[0]

    def discard(self) -> None:
        if self.spooled is not None:
            self.spooled.discard()


async def read_form(
    request: web.Request, artifacts: ArtifactStore, *, max_fields_bytes: int, idle_secs: float
) -> UploadForm:
    """Read the multipart body, spooling `content`. Raises `BadRequest` for a body that is not
    an upload form; the caller discards the result's spool when it fails later."""
    if not request.content_type.startswith("multipart/"):
        raise BadRequest("an upload is a multipart/form-data POST (what twine and uv publish send)")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise BadRequest(f"malformed multipart body: {exc}") from None
    form = UploadForm()
    budget = max_fields_bytes
    try:
        while True:
            part = await _timed(reader.next(), idle_secs)
            if part is None:
                break
            if isinstance(part, MultipartReader):
                raise BadRequest("nested multipart bodies are not an upload form")
            name = part.name or ""
            if name == "content":
                if form.spooled is not None:
                    raise BadRequest("an upload carries one file")
                form.filename = (part.filename or "").strip()
                if not form.filename:
                    raise BadRequest("the content part names no file")
                md5 = hashlib.md5(usedforsecurity=False)
                blake = hashlib.blake2b(digest_size=32)
                form.spooled = await artifacts.spool(_chunks(part, idle_secs, md5, blake))
                form.md5, form.blake2b_256 = md5.hexdigest(), blake.hexdigest()
                continue
            raw = await _read_field(part, budget, idle_secs)
            budget -= len(raw)
            if part.filename is None:  # signatures and attestations are files too, and unused
                form.fields.setdefault(name, []).append(raw.decode("utf-8", errors="replace"))
    except BaseException:
        form.discard()
        raise
    return form


async def _timed(awaitable: Any, idle_secs: float) -> Any:
    try:
        async with asyncio.timeout(idle_secs):
            return await awaitable
    except TimeoutError:
        raise RequestTimeout(f"no request body bytes for {idle_secs:g}s; closing") from None


async def _chunks(part: BodyPartReader, idle_secs: float, *hashers: Any) -> AsyncIterator[bytes]:
    while True:
        chunk = await _timed(part.read_chunk(CHUNK_SIZE), idle_secs)
        if not chunk:
            return
        for hasher in hashers:
            hasher.update(chunk)
        yield chunk


async def _read_field(part: BodyPartReader, budget: int, idle_secs: float) -> bytes:
    data = bytearray()
    while chunk := await _timed(part.read_chunk(CHUNK_SIZE), idle_secs):
        data += chunk
        if len(data) > budget:
            raise PayloadTooLarge("the upload's metadata fields are larger than limits.max_document_bytes")
    return bytes(data)


# --- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedUpload:
    project: str
    display_name: str
    version: str
    dist: DistFile
    metadata: dict[str, Any]
    core_metadata: bytes | None
    file_meta: dict[str, Any]


def check_digests(form: UploadForm) -> None:
    """Every digest the client announced must match the bytes received; at least one is needed."""
    assert form.spooled is not None
    actual = {
        "sha256_digest": form.spooled.digests()["sha256"],
        "md5_digest": form.md5,
        "blake2_256_digest": form.blake2b_256,
    }
    announced = {key: form.one(key).strip().lower() for key in actual if form.one(key).strip()}
    if not announced:
        raise BadRequest("an upload announces the file's digest (sha256_digest, md5_digest or blake2_256_digest)")
    for key, value in announced.items():
        if value != actual[key]:
            raise IntegrityError(f"the uploaded file does not match its {key}: it was corrupted on the way")


def form_metadata(form: UploadForm) -> RawMetadata:
    raw: dict[str, Any] = {}
    for key in _SINGLE:
        value = form.one(key)
        if value:
            raw[key] = value
    for key, target in _MULTI.items():
        values = [v for v in form.fields.get(key, []) if v]
        if values:
            raw[target] = values
    keywords = form.one("keywords")
    if keywords:
        raw["keywords"] = [k.strip() for k in keywords.split(",") if k.strip()]
    urls = {}
    for entry in form.fields.get("project_urls", []):
        label, sep, url = entry.partition(",")
        if sep:
            urls[label.strip()] = url.strip()
    if urls:
        raw["project_urls"] = urls
    return raw  # type: ignore[return-value]


def validated(raw: RawMetadata, what: str) -> Metadata:
    try:
        return Metadata.from_raw(raw, validate=True)
    except ExceptionGroup as group:
        problems = "; ".join(str(exc) for exc in group.exceptions[:5])
        raise BadRequest(f"invalid {what}: {problems}") from None
    except InvalidMetadata as exc:
        raise BadRequest(f"invalid {what}: {exc}") from None


def release_metadata(metadata: Metadata) -> dict[str, Any]:
    """The JSON-ready metadata a release keeps."""
    out: dict[str, Any] = {}
    for key in JSON_FIELDS:
        value = getattr(metadata, key, None)
        if value is None or value == [] or value == {}:
            continue
        if key == "requires_dist":
            value = [str(r) for r in value]
        elif key == "requires_python":
            value = str(value)
        elif key == "dynamic":
            value = [str(v) for v in value]
        elif key == "license_expression":
            value = str(value)
        out[key] = value
    return out


def read_wheel_metadata(path: Path, dist: DistFile) -> bytes:
    """The `METADATA` of the wheel at `path` (blocking: run it in a thread). The wheel must have
    exactly one `.dist-info` folder, named after its project and version."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise BadRequest(f"{dist.filename} is not a valid wheel: it needs exactly one .dist-info/METADATA")
            folder = names[0].split("/", 1)[0][: -len(".dist-info")]
            name, _, version = folder.rpartition("-")
            if normalize_name(name) != dist.project or normalize_version(version) != dist.version:
                raise BadRequest(f"{dist.filename} is not a valid wheel: its .dist-info folder is {folder}")
            info = archive.getinfo(names[0])
            if info.file_size > MAX_CORE_METADATA_BYTES:
                raise BadRequest(f"the METADATA of {dist.filename} is larger than {MAX_CORE_METADATA_BYTES} bytes")
            with archive.open(info) as fh:
                data = fh.read(MAX_CORE_METADATA_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"{dist.filename} is not a valid wheel: {exc}") from None
    if len(data) > MAX_CORE_METADATA_BYTES:
        raise BadRequest(f"the METADATA of {dist.filename} is larger than {MAX_CORE_METADATA_BYTES} bytes")
    return data


def parse_core_metadata(data: bytes, what: str) -> Metadata:
    raw, _ = parse_email(data)
    if "metadata_version" not in raw:
        raise BadRequest(f"invalid {what}: no Metadata-Version")
    return validated(raw, what)


async def check_upload(form: UploadForm) -> CheckedUpload:
    """Every check of the module docstring; `BadRequest` or `IntegrityError` names the problem."""
    action = form.one(":action")
    if action != "file_upload":
        raise BadRequest(f"unsupported :action {action!r}: this index accepts file_upload only")
    if form.spooled is None:
        raise BadRequest("the upload has no file (the content part)")
    name, version = form.one("name"), form.one("version")
    if not name or not version:
        raise BadRequest("an upload names its project and version (the name and version fields)")
    project = normalize_name(name)
    version = normalize_version(version)
    dist = check_filename(form.filename, project, version)
    filetype = form.one("filetype")
    if filetype and filetype != dist.packagetype:
        raise BadRequest(f"filetype {filetype!r} does not match the file {dist.filename} ({dist.packagetype})")
    if form.spooled.size == 0:
        raise BadRequest(f"{dist.filename} is empty")
    check_digests(form)
    metadata = validated(form_metadata(form), "metadata")
    core_metadata: bytes | None = None
    if dist.packagetype == "bdist_wheel":
        core_metadata = await asyncio.to_thread(read_wheel_metadata, form.spooled.path, dist)
        metadata = parse_core_metadata(core_metadata, f"METADATA of {dist.filename}")
        if normalize_name(metadata.name) != project or normalize_version(str(metadata.version)) != version:
            raise BadRequest(
                f"the METADATA of {dist.filename} names {metadata.name} {metadata.version},"
                f" but the upload is {name} {version}"
            )
    digests = form.spooled.digests()
    kept = release_metadata(metadata)
    file_meta: dict[str, Any] = {
        "sha256": digests["sha256"],
        "md5": form.md5,
        "blake2b_256": form.blake2b_256,
        "packagetype": dist.packagetype,
        "python_version": form.one("pyversion") or dist.python_version,
    }
    if "requires_python" in kept:
        file_meta["requires_python"] = kept["requires_python"]
    if core_metadata is not None:
        file_meta["core_metadata_sha256"] = hashlib.sha256(core_metadata).hexdigest()
    return CheckedUpload(
        project=project,
        display_name=metadata.name,
        version=version,
        dist=dist,
        metadata=kept,
        core_metadata=core_metadata,
        file_meta=file_meta,
    )
