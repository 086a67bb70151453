"""The audit log: who did what, when, from where, and with which result."""

from __future__ import annotations

import json
import time
from typing import Any

from batlehub.db import Connection


async def record(
    conn: Connection,
    action: str,
    *,
    registry: str | None = None,
    user_id: str | None = None,
    target: str | None = None,
    client_ip: str | None = None,
    result: str = "ok",
    detail: Any = "",
) -> None:
    """Append one entry. `conn` may be a transaction (the entry commits with the change) or the
    database itself (autocommit)."""
    await conn.execute(
        "INSERT INTO audit_log (ts, registry, user_id, action, target, client_ip, result, detail)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        time.time(),
        registry,
        user_id,
        action,
        target,
        client_ip,
        result,
        detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True),
    )
