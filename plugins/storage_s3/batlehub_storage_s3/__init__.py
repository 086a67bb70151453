"""BatleHub plugin: the `s3` storage backend (any S3-compatible object store).

Plugin hooks implemented: `register_storage_backends`.

Installed as the distribution `batlehub-storage-s3`, found through the `batlehub` entry-point
group; selected with `[storage] type = "s3"`. Objects are shared by every replica, and with
`redirect_downloads = true` clients fetch artifacts straight from S3 through presigned URLs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batlehub.errors import ConfigError, InvalidKey
from batlehub.interfaces import StorageBackendType
from batlehub.plugins import hookimpl
from batlehub.storage import validate_key
from batlehub_storage_s3.backend import MAX_PART_SIZE, MIN_PART_SIZE, S3Options, S3Storage

if TYPE_CHECKING:
    from batlehub.config import Settings

__all__ = ["S3Options", "S3Storage", "parse_options", "register_storage_backends"]

CONFIG_KEYS = frozenset(
    {
        "bucket",
        "region",
        "endpoint",
        "force_path_style",
        "access_key_id",
        "secret_access_key",
        "prefix",
        "redirect_downloads",
        "multipart_threshold_bytes",
        "part_size",
    }
)


def parse_options(section: Mapping[str, Any]) -> S3Options:
    """Validate `[storage]` into `S3Options`; raises `ConfigError` listing every problem, each
    named by its key (`storage.bucket: required`)."""
    problems: list[str] = []
    defaults = S3Options(bucket="")

    def text(key: str, default: str | None, *, required: bool = False) -> str | None:
        value = section.get(key)
        if value is None or value == "":
            if required:
                problems.append(f"storage.{key}: required")
            return default
        if not isinstance(value, str):
            problems.append(f"storage.{key}: expected a string, got {type(value).__name__}")
            return default
        return value

    def flag(key: str, default: bool) -> bool:
        value = section.get(key, default)
        if not isinstance(value, bool):
            problems.append(f"storage.{key}: expected true or false, got {value!r}")
            return default
        return value

    def size(key: str, default: int, minimum: int, maximum: int) -> int:
        value = section.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"storage.{key}: expected an integer, got {value!r}")
            return default
        if not minimum <= value <= maximum:
            problems.append(f"storage.{key}: must be between {minimum} and {maximum} bytes, got {value}")
            return default
        return value

    bucket = text("bucket", "", required=True) or ""
    region = text("region", defaults.region) or defaults.region
    endpoint = text("endpoint", None)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        problems.append(f"storage.endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    access_key_id = text("access_key_id", None)
    secret_access_key = text("secret_access_key", None)
    if (access_key_id is None) != (secret_access_key is None):
        problems.append(
            "storage.secret_access_key: set both access_key_id and secret_access_key, or neither "
            "(to use the AWS credential chain)"
        )
    prefix = (text("prefix", "") or "").strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except InvalidKey:
            problems.append(f"storage.prefix: {prefix!r} is not a safe relative key prefix")
        prefix += "/"
    part_size = size("part_size", defaults.part_size, MIN_PART_SIZE, MAX_PART_SIZE)
    threshold = size("multipart_threshold_bytes", defaults.multipart_threshold_bytes, 1, MAX_PART_SIZE)
    force_path_style = flag("force_path_style", defaults.force_path_style)
    redirect_downloads = flag("redirect_downloads", defaults.redirect_downloads)
    if problems:
        raise ConfigError(problems)
    return S3Options(
        bucket=bucket,
        region=region,
        endpoint=endpoint.rstrip("/") if endpoint else None,
        force_path_style=force_path_style,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        prefix=prefix,
        redirect_downloads=redirect_downloads,
        multipart_threshold_bytes=threshold,
        part_size=part_size,
    )


def make_s3_storage(section: Mapping[str, Any], settings: Settings) -> S3Storage:
    return S3Storage(parse_options(section))


@hookimpl
def register_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="s3",
            description="An S3-compatible bucket, shared by every replica; optional presigned download redirects.",
            factory=make_s3_storage,
            shared=True,
            capabilities=frozenset({"presigned_url"}),
            config_keys=CONFIG_KEYS,
        )
    ]
