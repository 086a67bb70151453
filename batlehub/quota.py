"""Strict per-user quotas, checked and counted in the same transaction that makes a version
visible: no number of concurrent publishes on any number of replicas can pass the limit, and a
failed publish leaves the counter as it was (its transaction rolls the increment back)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batlehub import metrics
from batlehub.errors import BatleHubError

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.db import Connection, Database

_UNLIMITED = 2**62


class QuotaExceeded(BatleHubError):
    status = 403
    # Many users may publish from one CI address; running out of quota is not abuse.
    violation = False


async def consume(
    conn: Connection, registry: RegistrySettings, user_id: str | None, size: int, versions: int = 1
) -> str | None:
    """Count `versions` versions (1 for a publish, 0 for one more file of a version) of `size`
    bytes against `user_id` inside the caller's transaction.

    Raises `QuotaExceeded` when over quota and enforcement is "block"; returns a warning text when
    over quota and enforcement is "warn"; returns None otherwise.
    """
    if user_id is None:
        user_id = "anonymous"
    await conn.execute(
        "INSERT INTO quota_usage (registry, user_id, bytes, versions) VALUES ($1, $2, 0, 0)"
        " ON CONFLICT (registry, user_id) DO NOTHING",
        registry.name,
        user_id,
    )
    quota = registry.quota
    max_bytes = quota.max_bytes_per_user if quota and quota.max_bytes_per_user else _UNLIMITED
    max_versions = quota.max_versions_per_user if quota and quota.max_versions_per_user else _UNLIMITED
    row = await conn.fetchrow(
        "UPDATE quota_usage SET bytes = bytes + $3, versions = versions + $6"
        # The casts: PostgreSQL would type $5 like `versions` (int4), and "unlimited" does not fit.
        " WHERE registry = $1 AND user_id = $2"
        " AND bytes + $3 <= CAST($4 AS BIGINT) AND versions + $6 <= CAST($5 AS BIGINT)"
        " RETURNING bytes, versions",
        registry.name,
        user_id,
        size,
        max_bytes,
        max_versions,
        versions,
    )
    if row is not None:
        return None
    message = (
        f"quota exceeded for user {user_id!r} in registry {registry.name!r}"
        f" (limits: {_fmt(quota.max_bytes_per_user if quota else 0)} bytes,"
        f" {_fmt(quota.max_versions_per_user if quota else 0)} versions)"
    )
    if quota is not None and quota.enforcement == "warn":
        metrics.count_quota(registry.name, "warned")
        await conn.execute(
            "UPDATE quota_usage SET bytes = bytes + $3, versions = versions + $4 WHERE registry = $1 AND user_id = $2",
            registry.name,
            user_id,
            size,
            versions,
        )
        return message
    metrics.count_quota(registry.name, "refused")
    raise QuotaExceeded(message)


async def release(conn: Connection, registry_name: str, user_id: str | None, size: int, versions: int = 1) -> None:
    """Give back what an unpublished version used (never below zero)."""
    await conn.execute(
        "UPDATE quota_usage SET bytes = CASE WHEN bytes > $3 THEN bytes - $3 ELSE 0 END,"
        " versions = CASE WHEN versions > $4 THEN versions - $4 ELSE 0 END"
        " WHERE registry = $1 AND user_id = $2",
        registry_name,
        user_id or "anonymous",
        size,
        versions,
    )


async def usage(conn: Connection, registry_name: str, user_id: str) -> tuple[int, int]:
    """(bytes, versions) counted against `user_id` in a registry."""
    row = await conn.fetchrow(
        "SELECT bytes, versions FROM quota_usage WHERE registry = $1 AND user_id = $2", registry_name, user_id
    )
    return (int(row["bytes"]), int(row["versions"])) if row else (0, 0)


def _fmt(limit: int) -> str:
    return str(limit) if limit else "unlimited"


async def all_usage(db: Database | Connection, limit: int = 1000) -> list[dict[str, Any]]:
    """Every (registry, user) that has published, most bytes first: what an operator scans."""
    return await db.fetch(
        "SELECT registry, user_id, bytes, versions FROM quota_usage"
        f" ORDER BY bytes DESC, versions DESC, registry, user_id LIMIT {int(limit)}"
    )
