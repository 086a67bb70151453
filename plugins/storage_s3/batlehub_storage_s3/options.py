"""The `[storage]` settings of `type = "s3"`, validated. Imported at start-up, so it leaves the S3
client library to `backend`, which is imported only when an S3 backend is built."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from batlehub.configmodel import ConfigModel
from batlehub.errors import InvalidKey
from batlehub.storage import validate_key

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB
"""S3 refuses smaller parts (except the last one)."""
MAX_PART_SIZE = 5 * 1024 * MiB


DEFAULT_REGION = "us-east-1"


def _none_if_empty(value: Any) -> Any:
    # An empty value (often an unset environment variable) means "not set", as it always has.
    return None if value == "" else value


def _default_region_if_empty(value: Any) -> Any:
    return DEFAULT_REGION if value == "" else value


def _endpoint(url: str | None) -> str | None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    return url.rstrip("/") if url else url


def _key_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    try:
        validate_key(prefix)
    except InvalidKey:
        raise ValueError(f"{prefix!r} is not a safe relative key prefix") from None
    return prefix + "/"


def _bytes_between(minimum: int, maximum: int) -> AfterValidator:
    def check(value: int) -> int:
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum} bytes, got {value}")
        return value

    return AfterValidator(check)


OptionalText = Annotated[str | None, BeforeValidator(_none_if_empty)]


class S3Options(ConfigModel):
    """The `[storage]` section of `type = "s3"` (the backend's `config_model`), validated."""

    bucket: Annotated[str, Field(min_length=1)]
    region: Annotated[str, BeforeValidator(_default_region_if_empty)] = DEFAULT_REGION
    endpoint: Annotated[OptionalText, AfterValidator(_endpoint)] = None
    """None: AWS itself; anything else is an S3-compatible service, without a trailing `/`."""
    force_path_style: bool = False
    access_key_id: OptionalText = None
    secret_access_key: OptionalText = Field(default=None, validate_default=True)
    """Both keys or neither: without them, the AWS credential chain (environment, profile, role)."""
    prefix: Annotated[str, AfterValidator(_key_prefix)] = ""
    """Always empty or ending in `/`."""
    redirect_downloads: bool = False
    multipart_threshold_bytes: Annotated[int, _bytes_between(1, MAX_PART_SIZE)] = 8 * MiB
    part_size: Annotated[int, _bytes_between(MIN_PART_SIZE, MAX_PART_SIZE)] = 8 * MiB

    @field_validator("secret_access_key")
    @classmethod
    def _both_keys_or_neither(cls, secret: str | None, info: ValidationInfo) -> str | None:
        if "access_key_id" not in info.data:
            return secret  # the access key has a problem of its own, reported already
        if (info.data["access_key_id"] is None) != (secret is None):
            raise ValueError(
                "set both access_key_id and secret_access_key, or neither (to use the AWS credential chain)"
            )
        return secret
