"""Core HTTP routes: health, the banner, registries, and the admin API (DESIGN §7). Package
ownership has its own module (`batlehub.ownership`), a caller's own tokens theirs
(`batlehub.accounts`), the web UI its package (`batlehub.web`).

Each admin change is one function that takes the caller and the request's values (`set_banner`,
`add_block`, `lift_block`, `issue_token`, `revoke`, `audit_entries`, `health_report`): the JSON
handlers here and the web UI's forms both go through them, so both check and audit the same way."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from batlehub import appkeys, audit, metrics, ownership, quota
from batlehub.auth import Identity, has_permission
from batlehub.config import TOKEN_ROLES, RegistrySettings, RetentionSettings, valid_user_id
from batlehub.coordination import LogThrottle
from batlehub.errors import BadRequest, Conflict, NotFound
from batlehub.interfaces import Banner, IpBlock
from batlehub.net import canonical_ip, is_trusted
from batlehub.plugins import describe_plugins
from batlehub.requests import identity, read_json, registry_url, require_admin, rfc3339
from batlehub.retention import Retention

log = logging.getLogger("batlehub.server")
_health_warnings = LogThrottle()

HEALTH_CHECK_TIMEOUT = 3.0
BANNER_LEVELS = ("info", "warning", "error")
MAX_OFFSET = 2**31 - 1
"""Past this, databases refuse the number (a 500), and no log is that long anyway."""
MAX_TOKEN_DAYS = 36500
"""100 years; more overflows the expiry to infinity. For a token that never expires, send null."""


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/admin/health", health)
    app.router.add_get("/api/v1/banner", get_banner)
    app.router.add_put("/api/v1/admin/banner", put_banner)
    app.router.add_delete("/api/v1/admin/banner", delete_banner)
    app.router.add_get("/api/v1/registries", list_registries)
    app.router.add_get("/api/v1/admin/plugins", list_plugins)
    app.router.add_get("/api/v1/admin/ip-blocks", list_ip_blocks)
    app.router.add_post("/api/v1/admin/ip-blocks", add_ip_block)
    app.router.add_delete("/api/v1/admin/ip-blocks/{ip}", delete_ip_block)
    app.router.add_get("/api/v1/admin/tokens", list_tokens)
    app.router.add_post("/api/v1/admin/tokens", create_token)
    app.router.add_delete("/api/v1/admin/tokens/{id}", delete_token)
    app.router.add_get("/api/v1/admin/quota/{registry}/{user_id}", get_quota)
    app.router.add_get("/api/v1/admin/audit-log", get_audit_log)
    ownership.add_routes(app)
    app.router.add_get("/api/v1/admin/registries/{registry}/retention", get_retention)
    app.router.add_post("/api/v1/admin/registries/{registry}/retention/run", run_retention)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, indent=None, sort_keys=False).encode(), status=status, content_type="application/json"
    )


async def read_object(request: web.Request, limit: int = 65536) -> dict[str, Any]:
    """A JSON object body (an empty body is `{}`)."""
    data = await read_json(request, limit, default={})
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


# --- health ----------------------------------------------------------------------------------------


async def _check(name: str, awaitable: Awaitable[Any]) -> str:
    """ "ok" or a short error for anyone to see; the details (paths, hosts) go to the log only."""
    try:
        await asyncio.wait_for(awaitable, HEALTH_CHECK_TIMEOUT)
    except TimeoutError:
        return f"error: no answer within {HEALTH_CHECK_TIMEOUT:g}s"
    except Exception as exc:
        if _health_warnings(name):
            log.warning("health: the %s check failed: %s: %s", name, type(exc).__name__, exc)
        return f"error: {type(exc).__name__} (details in the server log)"
    return "ok"


async def check_backends(app: web.Application) -> dict[str, str]:
    """Each backend's answer to a ping: "ok" or a short error (also `batlehub_backend_up`)."""
    database, storage, cache = await asyncio.gather(
        _check("database", app[appkeys.DATABASE].ping()),
        _check("storage", app[appkeys.STORAGE].ping()),
        _check("cache", app[appkeys.CACHE].ping()),
    )
    checks = {"database": database, "storage": storage, "cache": cache}
    metrics.record_health(checks)
    return checks


async def health(request: web.Request) -> web.Response:
    """200 when the database and storage answer; 503 otherwise, and while shutting down.

    A cache backend that does not answer is reported as "degraded" with 200: every store fails open
    (misses, no limits) and the database still answers, so draining every replica at once for a
    cache outage would turn a degradation into an outage.
    """
    body, code = await health_report(request.app)
    return _json(body, code)


async def health_report(app: web.Application) -> tuple[dict[str, Any], int]:
    """The health answer and its status (see `health`)."""
    state = app[appkeys.STATE]
    checks = await check_backends(app)
    database, storage, cache = checks["database"], checks["storage"], checks["cache"]
    if state.shutting_down:
        status, code = "shutting_down", 503
    elif database != "ok" or storage != "ok":
        status, code = "unavailable", 503
    elif cache != "ok":
        status, code = "degraded", 200
    else:
        status, code = "ok", 200
    body: dict[str, Any] = {"status": status, "checks": checks}
    if state.warnings:
        body["warnings"] = state.warnings
    return body, code


# --- banner ----------------------------------------------------------------------------------------


async def get_banner(request: web.Request) -> web.Response:
    banner = await request.app[appkeys.CACHE].get_banner()
    return _json({"message": banner.message, "level": banner.level} if banner else {"message": None})


async def put_banner(request: web.Request) -> web.Response:
    admin = require_admin(request)
    banner = await set_banner(request, admin, await read_object(request))
    return _json({"message": banner.message, "level": banner.level})


async def set_banner(request: web.Request, admin: Identity, data: Mapping[str, Any]) -> Banner:
    message, level = data.get("message"), data.get("level", "info")
    if not isinstance(message, str) or not message.strip() or len(message) > 1000 or "\n" in message:
        raise BadRequest("message: expected a non-empty single-line string of at most 1000 characters")
    if level not in BANNER_LEVELS:
        raise BadRequest(f"level: expected one of {', '.join(BANNER_LEVELS)}")
    banner = Banner(message=message, level=level)
    await request.app[appkeys.CACHE].set_banner(banner)
    request.app[appkeys.FAIL_OPEN_CACHE].remember_banner(banner)
    await _audit(request, "banner.set", admin, target=message)
    return banner


async def delete_banner(request: web.Request) -> web.Response:
    await clear_banner(request, require_admin(request))
    return _json({"ok": True})


async def clear_banner(request: web.Request, admin: Identity) -> None:
    await request.app[appkeys.CACHE].set_banner(None)
    request.app[appkeys.FAIL_OPEN_CACHE].remember_banner(None)
    await _audit(request, "banner.clear", admin)


# --- registries and plugins ------------------------------------------------------------------------


async def list_registries(request: web.Request) -> web.Response:
    caller = identity(request)
    settings = request.app[appkeys.SETTINGS]
    items = [
        {
            "name": r.name,
            "type": r.type,
            "mode": registry_mode(r),
            "url": registry_url(request, r.name) + "/",
        }
        for r in settings.registries
        if has_permission(caller, r, "releases:read")
    ]
    return _json({"registries": items})


async def list_plugins(request: web.Request) -> web.Response:
    require_admin(request)
    infos = describe_plugins(request.app[appkeys.PLUGIN_MANAGER])
    return _json(
        {
            "plugins": [
                {
                    "name": i.name,
                    "distribution": i.distribution,
                    "version": i.version,
                    "hooks": list(i.hooks),
                    "provides": list(i.provides),
                }
                for i in infos
            ]
        }
    )


def registry_mode(registry: RegistrySettings) -> str | None:
    """A registry's mode (`proxy`, `local`, `hybrid`), or None for a format without modes."""
    options = registry.options
    # Formats without modes have no such key; a running app holds validated options.
    return options.get("mode") if isinstance(options, Mapping) else getattr(options, "mode", None)


# --- IP blocks -------------------------------------------------------------------------------------


def _block_json(block: IpBlock) -> dict[str, Any]:
    return {"ip": block.ip, "reason": block.reason, "expires_at": block.expires_at, "created_at": block.created_at}


async def list_ip_blocks(request: web.Request) -> web.Response:
    require_admin(request)
    blocks = await request.app[appkeys.CACHE].list_blocks()
    return _json({"blocks": [_block_json(b) for b in sorted(blocks, key=lambda b: b.created_at)]})


async def add_ip_block(request: web.Request) -> web.Response:
    admin = require_admin(request)
    block = await add_block(request, admin, await read_object(request))
    return _json(_block_json(block), 201)


async def add_block(request: web.Request, admin: Identity, data: Mapping[str, Any]) -> IpBlock:
    raw_ip, reason = data.get("ip"), data.get("reason", "blocked by an administrator")
    duration = data.get("duration_secs", request.app[appkeys.SETTINGS].ip_blocking.ban_duration_secs)
    # The canonical form, the way requests are matched (an IPv4-mapped IPv6 address is IPv4).
    ip = canonical_ip(raw_ip) if isinstance(raw_ip, str) and "/" not in raw_ip and " " not in raw_ip else None
    if ip is None:
        raise BadRequest("ip: expected an IPv4 or IPv6 address")
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadRequest("reason: expected a string of at most 500 characters")
    if isinstance(duration, bool) or not isinstance(duration, int | float) or duration <= 0:
        raise BadRequest("duration_secs: expected a positive number")
    if is_trusted(ip, request.app[appkeys.SETTINGS].server.trusted_proxies):
        raise BadRequest(f"ip: {ip} is in server.trusted_proxies; blocking it would block every client behind it")
    now = time.time()
    block = IpBlock(ip=ip, reason=reason, expires_at=now + float(duration), created_at=now)
    await request.app[appkeys.CACHE].block_ip(block)
    request.app[appkeys.BLOCKS].put(block)
    await _audit(request, "ip_block.add", admin, target=ip, detail={"reason": reason, "duration_secs": duration})
    return block


async def delete_ip_block(request: web.Request) -> web.Response:
    await lift_block(request, require_admin(request), request.match_info["ip"])
    return _json({"ok": True})


async def lift_block(request: web.Request, admin: Identity, raw_ip: str) -> str:
    """Lift the block of `raw_ip`; returns the address as blocks are stored. `NotFound` if none."""
    # Blocks are stored under the canonical form ("2001:db8::7"), however the operator types it;
    # not an address: nothing can be blocked under it, and the 404 below says so.
    ip = canonical_ip(raw_ip) or raw_ip
    if not await request.app[appkeys.CACHE].unblock_ip(ip):
        raise NotFound(f"no block for {ip}")
    request.app[appkeys.BLOCKS].drop(ip)
    await _audit(request, "ip_block.remove", admin, target=ip)
    return ip


# --- tokens ----------------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    require_admin(request)
    return _json({"tokens": [token_json(t) for t in await request.app[appkeys.AUTH].list_tokens()]})


async def create_token(request: web.Request) -> web.Response:
    admin = require_admin(request)
    return _json(await issue_token(request, admin, await read_object(request)), 201)


async def issue_token(
    request: web.Request, caller: Identity, data: Mapping[str, Any], *, own: bool = False
) -> dict[str, Any]:
    """Create a token from `{"user_id", "role", "expires_in_days", "description"}`; returns its
    record with the secret under `token` (shown once). `own`: the caller's own token (their
    user id, at most their role), whoever they are; otherwise the caller is an admin."""
    user_id, role, days = data.get("user_id"), data.get("role", "user"), data.get("expires_in_days")
    if own:
        if caller.user_id is None:
            raise BadRequest("sign in to create a token")
        if user_id not in (None, caller.user_id):
            raise BadRequest("user_id: you can only create tokens for yourself")
        user_id, role = caller.user_id, data.get("role", caller.role)
        if role != caller.role and role != "user":
            raise BadRequest(f'role: expected "user" or your own role, "{caller.role}"')
    if not isinstance(user_id, str) or not valid_user_id(user_id):
        raise BadRequest("user_id: expected 1 to 200 printable characters without spaces")
    if role not in TOKEN_ROLES:
        raise BadRequest('role: expected "user", "admin" or "metrics"')
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= MAX_TOKEN_DAYS
    ):
        raise BadRequest(f"expires_in_days: expected a positive number up to {MAX_TOKEN_DAYS}, or null")
    description = data.get("description", "")
    if not isinstance(description, str) or len(description) > 500 or "\n" in description:
        raise BadRequest("description: expected a single-line string of at most 500 characters")
    record, token = await request.app[appkeys.AUTH].create_token(user_id, role, days, description)
    await _audit(request, "token.create", caller, target=record["id"], detail={"user_id": user_id, "role": role})
    return {**token_json(record), "token": token}


def token_json(record: dict[str, Any]) -> dict[str, Any]:
    """A token's record with its times as RFC 3339 (`2026-12-02T16:25:21.250Z`), null when unset."""
    return {
        k: rfc3339(v) if k in ("created", "expires", "last_used") and v is not None else v for k, v in record.items()
    }


async def delete_token(request: web.Request) -> web.Response:
    await revoke(request, require_admin(request), request.match_info["id"])
    return _json({"ok": True})


async def revoke(request: web.Request, caller: Identity, token_id: str, *, own: bool = False) -> None:
    """Revoke a token: any (an admin), or with `own` only one of the caller's. `NotFound` if not."""
    owner = caller.user_id if own else None
    if own and owner is None:
        raise NotFound(f"no active token with id {token_id}")
    if not await request.app[appkeys.AUTH].revoke_token(token_id, owner):
        raise NotFound(f"no active token with id {token_id}")
    await _audit(request, "token.revoke", caller, target=token_id)


# --- quota and audit log ---------------------------------------------------------------------------


async def get_quota(request: web.Request) -> web.Response:
    require_admin(request)
    return _json(await quota_report(request.app, request.match_info["registry"], request.match_info["user_id"]))


async def quota_report(app: web.Application, registry_name: str, user_id: str) -> dict[str, Any]:
    registry = app[appkeys.SETTINGS].registry(registry_name)
    if registry is None:
        raise NotFound(f"no registry named {registry_name!r}")
    used_bytes, used_versions = await quota.usage(app[appkeys.DATABASE], registry_name, user_id)
    limits = registry.quota
    return {
        "registry": registry_name,
        "user_id": user_id,
        "used_bytes": used_bytes,
        "used_versions": used_versions,
        "max_bytes": limits.max_bytes_per_user if limits else 0,
        "max_versions": limits.max_versions_per_user if limits else 0,
        "enforcement": limits.enforcement if limits else None,
    }


# --- retention ---------------------------------------------------------------------------------------


def _retention(request: web.Request) -> tuple[RegistrySettings, Retention]:
    require_admin(request)
    name = request.match_info["registry"]
    services = request.app[appkeys.REGISTRY_SERVICES].get(name)
    if services is None:
        raise NotFound(f"no registry named {name!r}")
    return services.registry, services.retention


async def get_retention(request: web.Request) -> web.Response:
    """The registry's retention settings, how much proxied content it holds, and the last run."""
    registry, retention = _retention(request)
    settings = registry.retention
    return _json(
        {
            "registry": registry.name,
            "settings": dataclasses.asdict(settings) if settings else None,
            "usage": await retention.usage(),
            "last_run": await retention.stored_report(),
        }
    )


async def run_retention(request: web.Request) -> web.Response:
    """Run retention now: `{"dry_run": true}` lists what would go; a dry run may also preview other
    limits (`max_bytes`, `max_idle_days`) than the configured ones. 409 while another replica runs it."""
    registry, retention = _retention(request)
    data = await read_object(request)
    unknown = set(data) - {"dry_run", "max_bytes", "max_idle_days"}
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(unknown))}; expected dry_run, max_bytes, max_idle_days")
    dry_run = data.get("dry_run", registry.retention.dry_run if registry.retention else False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run: expected true or false")
    preview = None
    if "max_bytes" in data or "max_idle_days" in data:
        if not dry_run:
            raise BadRequest("max_bytes and max_idle_days preview other limits: only with dry_run true")
        base = registry.retention or RetentionSettings()
        max_bytes, max_idle_days = data.get("max_bytes", base.max_bytes), data.get("max_idle_days", base.max_idle_days)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise BadRequest("max_bytes: expected a whole number of bytes, 0 or more")
        if (
            isinstance(max_idle_days, bool)
            or not isinstance(max_idle_days, int | float)
            or not 0 <= max_idle_days < 1e6
        ):
            raise BadRequest("max_idle_days: expected a number of days, 0 or more")
        preview = RetentionSettings(max_bytes=max_bytes, max_idle_days=float(max_idle_days), dry_run=True)
    elif registry.retention is None and not dry_run:
        raise BadRequest(
            f"registry {registry.name!r} has no [registries.retention] settings; add max_bytes or"
            " max_idle_days to its entry, or preview limits with a dry run"
        )
    report = await retention.run(dry_run=dry_run, settings=preview)
    if report is None:
        raise Conflict("retention is running on another replica; its report appears here when it is done")
    return _json(report.to_json())


def _query_number(query: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a number") from None
    if not math.isfinite(value):  # "inf" and "nan" parse, but int() of them is a 500
        raise BadRequest(f"{name}: expected a number")
    return value


def _query_time(query: Mapping[str, str], name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 time (`2026-11-28T05:00:00Z`; without a zone, UTC): an
    operator reading the log types dates, a script passes numbers."""
    raw = query.get(name, "")
    try:
        return _query_number(query, name, None)
    except BadRequest:
        pass
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected epoch seconds or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def get_audit_log(request: web.Request) -> web.Response:
    require_admin(request)
    return _json(await audit_entries(request.app, request.query))


async def audit_entries(app: web.Application, query: Mapping[str, str]) -> dict[str, Any]:
    """The audit log's entries that `query` asks for (`registry`, `user`, `action`, `since`,
    `until`, `denied_only`, `limit`, `offset`), newest first, with the total that match."""
    where: list[str] = []
    args: list[Any] = []

    def add(condition: str, value: Any) -> None:
        args.append(value)
        where.append(condition.replace("?", f"${len(args)}"))

    for name, column in (("registry", "registry"), ("user", "user_id"), ("action", "action")):
        value = query.get(name)
        if value:
            if "\x00" in value or len(value) > 500:
                raise BadRequest(f"{name}: not a {name}")
            add(f"{column} = ?", value)
    since = _query_time(query, "since")
    until = _query_time(query, "until")
    if since is not None:
        add("ts >= ?", since)
    if until is not None:
        add("ts < ?", until)
    if query.get("denied_only") in ("1", "true", "yes", "on"):
        where.append("result = 'denied'")
    limit = _query_number(query, "limit", 100) or 0  # `or 0`: limit=0 is refused below, not 100
    offset = _query_number(query, "offset", 0) or 0
    if not 1 <= limit <= 1000 or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest(f"limit: 1..1000; offset: 0..{MAX_OFFSET}")
    limit, offset = int(limit), int(offset)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    db = app[appkeys.DATABASE]
    total = await db.fetchval(f"SELECT COUNT(*) FROM audit_log {clause}", *args)
    rows = await db.fetch(
        f"SELECT id, ts, registry, user_id, action, target, client_ip, result, detail FROM audit_log {clause}"
        f" ORDER BY id DESC LIMIT {limit} OFFSET {offset}",
        *args,
    )
    return {"entries": rows, "total": int(total or 0), "limit": limit, "offset": offset}


async def _audit(
    request: web.Request, action: str, caller: Identity, *, target: str | None = None, detail: Any = ""
) -> None:
    await audit.record(
        request.app[appkeys.DATABASE],
        action,
        user_id=caller.user_id,
        target=target,
        client_ip=request.get(appkeys.CLIENT_IP),
        detail=detail,
    )


# --- static web UI ---------------------------------------------------------------------------------


def add_static_ui(app: web.Application, static_dir: Path) -> None:
    """Serve the web UI from `static_dir`; unknown paths fall back to index.html (SPA routing)."""
    root = static_dir.resolve()

    async def serve(request: web.Request) -> web.StreamResponse:
        tail = request.match_info.get("tail", "")
        if tail.startswith(("api/", "registries/")):
            raise NotFound("not found")
        try:  # a NUL byte or an over-long name is no file of ours, not a server error
            candidate = (root / tail).resolve() if tail else root / "index.html"
            is_ours = candidate.is_relative_to(root) and candidate.is_file()
        except (OSError, ValueError):
            is_ours = False
        if is_ours:
            return web.FileResponse(candidate)
        index = root / "index.html"
        if index.is_file():
            return web.FileResponse(index)
        raise NotFound("not found")

    app.router.add_get("/{tail:.*}", serve)
