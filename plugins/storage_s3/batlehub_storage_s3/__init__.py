"""BatleHub plugin: the `s3` storage backend (any S3-compatible object store).

Plugin hooks implemented: `register_storage_backends`.

Installed as the distribution `batlehub-storage-s3`, found through the `batlehub` entry-point
group; selected with `[storage] type = "s3"`. Objects are shared by every replica, and with
`redirect_downloads = true` clients fetch artifacts straight from S3 through presigned URLs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batlehub.interfaces import StorageBackendType
from batlehub.plugins import hookimpl
from batlehub_storage_s3.options import S3Options

if TYPE_CHECKING:
    from batlehub.config import Settings
    from batlehub_storage_s3.backend import S3Storage

__all__ = ["S3Options", "S3Storage", "register_storage_backends"]


def make_s3_storage(config: S3Options, settings: Settings) -> S3Storage:
    """Build from the validated `[storage]` table (no connection is made until `open`)."""
    from batlehub_storage_s3.backend import S3Storage  # the S3 client library: only when used

    return S3Storage(config)


def __getattr__(name: str) -> object:
    if name == "S3Storage":
        from batlehub_storage_s3.backend import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def register_storage_backends() -> list[StorageBackendType]:
    return [
        StorageBackendType(
            name="s3",
            description="An S3-compatible bucket, shared by every replica; optional presigned download redirects.",
            factory=make_s3_storage,
            shared=True,
            capabilities=frozenset({"presigned_url"}),
            config_model=S3Options,
        )
    ]
