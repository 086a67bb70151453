"""Reading `PUT /{package}` bodies as a stream, and checking what they publish.

A publish body is JSON with the tarball inside as one base64 string
(`_attachments.<file>.data`), and can be hundreds of megabytes. We never hold it whole: core's
incremental reader (`JsonStream`) builds everything else as Python objects (bounded by
`max_document_bytes`) and hands the attachment's bytes, base64-decoded chunk by chunk, to a
callback while they arrive. The callback streams them into storage, hashing as it goes.

npm sends `versions` before `_attachments`, so the manifest (and with it the expected digests) is
usually known when the data starts; for clients that order keys differently the bytes are spooled
to a temporary file first and stored once the manifest has been read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from batlehub.api import BadRequest, IncomingBlob, JsonStream, ReadChunk
from batlehub_npm.integrity import expected_digests
from batlehub_npm.names import PackageName, validate_tag, validate_version

DEFAULT_MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
"""Everything in a publish body except the tarball itself: manifests, readme, tags."""
StoreAttachment = Callable[[Mapping[str, Any], str, AsyncIterator[bytes]], Awaitable[Any]]


def max_body_bytes(max_artifact_size: int, max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> int:
    """The largest publish body worth reading: the biggest tarball in base64 plus the document."""
    return -(-max_artifact_size // 3) * 4 + max_document_bytes


def malformed(detail: str) -> BadRequest:
    return BadRequest(f"malformed package document: {detail}")  # as JsonStream says it for this name


@dataclass
class ParsedBody:
    document: dict[str, Any]
    """The whole body except `_attachments`."""
    attachments: dict[str, dict[str, Any]]
    """Attachment file name -> its fields other than `data` (content_type, length)."""
    stored: Any
    """What the attachment callback returned, or None without attachment data."""


async def parse_document(
    read: ReadChunk,
    *,
    store_attachment: StoreAttachment | None = None,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> ParsedBody:
    """Parse a package document from `read()` (returns b"" at the end).

    `_attachments.<file>.data` is streamed into `store_attachment(document_so_far, file, chunks)`,
    which must consume `chunks`; without a callback, attachment data is refused.
    """
    reader = JsonStream(read, max_document_bytes, name="package document", streamed="attachment data")
    document: dict[str, Any] = {}
    attachments: dict[str, dict[str, Any]] = {}
    stored: Any = None
    async for key in reader.members():
        if key == "_attachments":
            stored = await _attachments(reader, document, attachments, store_attachment)
        else:
            document[key] = await reader.value()
    if await reader.peek() is not None:
        raise malformed("unexpected data after the document")
    return ParsedBody(document, attachments, stored)


async def _attachments(
    reader: JsonStream,
    document: dict[str, Any],
    attachments: dict[str, dict[str, Any]],
    store_attachment: StoreAttachment | None,
) -> Any:
    stored = None
    if await reader.peek() == ord("n"):
        if await reader.value() is not None:
            raise malformed("_attachments must be an object")
        return None
    async for filename in reader.members():
        if attachments:
            raise BadRequest("a publish may carry only one tarball attachment")
        fields: dict[str, Any] = {}
        attachments[filename] = fields
        async for key in reader.members():
            if key == "data":
                if await reader.peek() != ord('"'):
                    raise BadRequest(f"attachment {filename!r}: data must be a base64 string")
                if store_attachment is None:
                    raise BadRequest("attachments are only accepted when publishing a new version")
                reader.pos += 1
                chunks = reader.base64_string()
                stored = await store_attachment(document, filename, chunks)
                async for _ in chunks:  # a callback that stopped early: the string must still be valid
                    pass
                fields["_has_data"] = True
            else:
                fields[key] = await reader.value()
    return stored


# --- what a publish publishes ----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishRequest:
    """A validated publish body: one new version and the tags that should point at it."""

    package: PackageName
    version: str
    manifest: dict[str, Any]
    dist_tags: dict[str, str]
    readme: str | None


def parse_publish(package: PackageName, document: Mapping[str, Any]) -> PublishRequest:
    """Check a publish body's shape; every problem is a 400 naming the field."""
    for key in ("_id", "name"):
        if key in document and document[key] != package.name:
            raise BadRequest(f"document {key} {document[key]!r} does not match the URL's package {package.name!r}")
    versions = document.get("versions")
    if not isinstance(versions, Mapping) or not versions:
        raise BadRequest("a publish needs a versions object with the new version")
    if len(versions) != 1:
        raise BadRequest("publish one version at a time")
    version, manifest = next(iter(versions.items()))
    validate_version(version)
    if not isinstance(manifest, dict):
        raise BadRequest(f"versions[{version!r}] must be an object")
    if manifest.get("name") != package.name:
        raise BadRequest(f"versions[{version!r}].name must be {package.name!r}")
    if manifest.get("version") != version:
        raise BadRequest(f"versions[{version!r}].version must be {version!r}")
    for field in ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies"):
        deps = manifest.get(field)
        if deps is not None and (not isinstance(deps, Mapping) or not all(isinstance(v, str) for v in deps.values())):
            raise BadRequest(f"versions[{version!r}].{field} must map names to version ranges")
    expected_digests(manifest.get("dist"), strict=True)
    tags = document.get("dist-tags", {})
    if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
        raise BadRequest("dist-tags must be an object of tag -> version")
    dist_tags = {validate_tag(tag): v for tag, v in tags.items()}
    for tag, target in dist_tags.items():
        if target != version:
            raise BadRequest(f"dist-tag {tag!r} must point at the published version {version}")
    if not dist_tags:
        dist_tags = {"latest": version}
    readme = manifest.get("readme", document.get("readme"))
    return PublishRequest(package, version, manifest, dist_tags, readme if isinstance(readme, str) else None)


def single_manifest(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """The one version manifest of a publish body, if `versions` was read already."""
    versions = document.get("versions")
    if isinstance(versions, Mapping) and len(versions) == 1:
        manifest = next(iter(versions.values()))
        return manifest if isinstance(manifest, dict) else None
    return None


class TarballSink(IncomingBlob):
    """The attachment callback for publishes: the tarball streams straight into storage when the
    manifest, read before it, announces its sha512; else core spools it until `finish`."""

    async def __call__(self, document: Mapping[str, Any], filename: str, chunks: AsyncIterator[bytes]) -> Any:
        manifest = single_manifest(document)
        return await self.receive(chunks, expected_digests(manifest.get("dist"), strict=True) if manifest else {})


__all__ = [
    "DEFAULT_MAX_DOCUMENT_BYTES",
    "ParsedBody",
    "PublishRequest",
    "TarballSink",
    "max_body_bytes",
    "parse_document",
    "parse_publish",
    "single_manifest",
]
