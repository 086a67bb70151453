"""Domain errors. Handlers and backends raise these; one middleware maps them to HTTP.

Each error carries the HTTP status it stands for and a short message the client sees as
`{"error": message}` (the npm CLI prints it). Extra response headers ride along in `headers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class BatleHubError(Exception):
    """Base of every error that reaches a client with a meaningful status."""

    status: int = 500
    violation: bool = True
    """Whether this refusal counts towards automatic IP blocking when its status is in
    `ip_blocking.trigger_on_status`. False for refusals that say nothing about abuse."""

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        self.body: dict[str, Any] = {}
        """More members of the JSON answer, next to `error` (e.g. the policy that refused)."""


class BadRequest(BatleHubError):
    status = 400


class Unauthorized(BatleHubError):
    status = 401

    def __init__(self, message: str = "authentication required", *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)


class Forbidden(BatleHubError):
    status = 403


class NotFound(BatleHubError):
    status = 404


class MethodNotAllowed(BatleHubError):
    status = 405


class RequestTimeout(BatleHubError):
    """The client stopped sending its request; the connection is closed after the answer."""

    status = 408


class Conflict(BatleHubError):
    status = 409


class AlreadyExists(Conflict):
    """A row with that key exists already (the database's unique constraint said so)."""


class PayloadTooLarge(BatleHubError):
    status = 413


class UnprocessableEntity(BatleHubError):
    """The request was well-formed but its content is wrong (e.g. an integrity mismatch)."""

    status = 422


class RateLimited(BatleHubError):
    status = 429


class UpstreamError(BatleHubError):
    """An upstream registry or a backing service answered badly."""

    status = 502


class ServiceUnavailable(BatleHubError):
    """A dependency (database, storage, cache, upstream) cannot be reached right now."""

    status = 503


class IntegrityError(UnprocessableEntity):
    """Bytes did not match the digest they were announced with; nothing was stored."""


class InvalidKey(BadRequest):
    """A storage key or package name tried to escape its namespace (`..`, NUL, backslash, ...)."""


class ConfigError(Exception):
    """Configuration problems, every one of them, each naming its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StartupError(Exception):
    """Something the server needs at start is missing; the CLI prints the message and exits 1."""
