"""Core HTTP routes: health, the banner, registries, and the admin API (DESIGN §7). Package
ownership has its own module (`batlehub.ownership`)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from aiohttp import web

from batlehub import __version__, appkeys, audit, metrics, ownership, quota
from batlehub.auth import Identity, has_permission
from batlehub.config import TOKEN_ROLES, valid_user_id
from batlehub.coordination import LogThrottle
from batlehub.errors import BadRequest, NotFound
from batlehub.guide import registry_guides
from batlehub.interfaces import Banner, IpBlock
from batlehub.net import canonical_ip, is_trusted
from batlehub.plugins import describe_plugins
from batlehub.requests import base_url, identity, read_json, registry_url, require_admin

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
    app = request.app
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
    return _json(body, code)


# --- banner ----------------------------------------------------------------------------------------


async def get_banner(request: web.Request) -> web.Response:
    banner = await request.app[appkeys.CACHE].get_banner()
    return _json({"message": banner.message, "level": banner.level} if banner else {"message": None})


async def put_banner(request: web.Request) -> web.Response:
    admin = require_admin(request)
    data = await read_object(request)
    message, level = data.get("message"), data.get("level", "info")
    if not isinstance(message, str) or not message.strip() or len(message) > 1000 or "\n" in message:
        raise BadRequest("message: expected a non-empty single-line string of at most 1000 characters")
    if level not in BANNER_LEVELS:
        raise BadRequest(f"level: expected one of {', '.join(BANNER_LEVELS)}")
    await request.app[appkeys.CACHE].set_banner(Banner(message=message, level=level))
    await _audit(request, "banner.set", admin, target=message)
    return _json({"message": message, "level": level})


async def delete_banner(request: web.Request) -> web.Response:
    admin = require_admin(request)
    await request.app[appkeys.CACHE].set_banner(None)
    await _audit(request, "banner.clear", admin)
    return _json({"ok": True})


# --- registries and plugins ------------------------------------------------------------------------


async def list_registries(request: web.Request) -> web.Response:
    caller = identity(request)
    settings = request.app[appkeys.SETTINGS]
    items = [
        {
            "name": r.name,
            "type": r.type,
            # Formats without modes have no such key; a running app holds validated options.
            "mode": r.options.get("mode") if isinstance(r.options, Mapping) else getattr(r.options, "mode", None),
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


# --- IP blocks -------------------------------------------------------------------------------------


def _block_json(block: IpBlock) -> dict[str, Any]:
    return {"ip": block.ip, "reason": block.reason, "expires_at": block.expires_at, "created_at": block.created_at}


async def list_ip_blocks(request: web.Request) -> web.Response:
    require_admin(request)
    blocks = await request.app[appkeys.CACHE].list_blocks()
    return _json({"blocks": [_block_json(b) for b in sorted(blocks, key=lambda b: b.created_at)]})


async def add_ip_block(request: web.Request) -> web.Response:
    admin = require_admin(request)
    data = await read_object(request)
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
    await _audit(request, "ip_block.add", admin, target=ip, detail={"reason": reason, "duration_secs": duration})
    return _json(_block_json(block), 201)


async def delete_ip_block(request: web.Request) -> web.Response:
    admin = require_admin(request)
    # Blocks are stored under the canonical form ("2001:db8::7"), however the operator types it;
    # not an address: nothing can be blocked under it, and the 404 below says so.
    ip = canonical_ip(request.match_info["ip"]) or request.match_info["ip"]
    if not await request.app[appkeys.CACHE].unblock_ip(ip):
        raise NotFound(f"no block for {ip}")
    await _audit(request, "ip_block.remove", admin, target=ip)
    return _json({"ok": True})


# --- tokens ----------------------------------------------------------------------------------------


async def list_tokens(request: web.Request) -> web.Response:
    require_admin(request)
    return _json({"tokens": [_token_json(t) for t in await request.app[appkeys.AUTH].list_tokens()]})


async def create_token(request: web.Request) -> web.Response:
    admin = require_admin(request)
    data = await read_object(request)
    user_id, role, days = data.get("user_id"), data.get("role", "user"), data.get("expires_in_days")
    if not isinstance(user_id, str) or not valid_user_id(user_id):
        raise BadRequest("user_id: expected 1 to 200 printable characters without spaces")
    if role not in TOKEN_ROLES:
        raise BadRequest('role: expected "user", "admin" or "metrics"')
    if days is not None and (
        isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= MAX_TOKEN_DAYS
    ):
        raise BadRequest(f"expires_in_days: expected a positive number up to {MAX_TOKEN_DAYS}, or null")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BadRequest("description: expected a string")
    record, token = await request.app[appkeys.AUTH].create_token(user_id, role, days, description)
    await _audit(request, "token.create", admin, target=record["id"], detail={"user_id": user_id, "role": role})
    return _json({**_token_json(record), "token": token}, 201)


def _token_json(record: dict[str, Any]) -> dict[str, Any]:
    """A token's record with its times as RFC 3339 (`2026-12-02T16:25:21.250Z`), null when unset."""
    return {
        k: rfc3339(v) if k in ("created", "expires", "last_used") and v is not None else v for k, v in record.items()
    }


def rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


async def delete_token(request: web.Request) -> web.Response:
    admin = require_admin(request)
    token_id = request.match_info["id"]
    if not await request.app[appkeys.AUTH].revoke_token(token_id):
        raise NotFound(f"no active token with id {token_id}")
    await _audit(request, "token.revoke", admin, target=token_id)
    return _json({"ok": True})


# --- quota and audit log ---------------------------------------------------------------------------


async def get_quota(request: web.Request) -> web.Response:
    require_admin(request)
    registry_name, user_id = request.match_info["registry"], request.match_info["user_id"]
    registry = request.app[appkeys.SETTINGS].registry(registry_name)
    if registry is None:
        raise NotFound(f"no registry named {registry_name!r}")
    used_bytes, used_versions = await quota.usage(request.app[appkeys.DATABASE], registry_name, user_id)
    limits = registry.quota
    return _json(
        {
            "registry": registry_name,
            "user_id": user_id,
            "used_bytes": used_bytes,
            "used_versions": used_versions,
            "max_bytes": limits.max_bytes_per_user if limits else 0,
            "max_versions": limits.max_versions_per_user if limits else 0,
            "enforcement": limits.enforcement if limits else None,
        }
    )


def _query_number(request: web.Request, name: str, default: float | None) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a number") from None
    if not math.isfinite(value):  # "inf" and "nan" parse, but int() of them is a 500
        raise BadRequest(f"{name}: expected a number")
    return value


def _query_time(request: web.Request, name: str) -> float | None:
    """Epoch seconds, or an ISO 8601 time (`2026-11-28T05:00:00Z`; without a zone, UTC): an
    operator reading the log types dates, a script passes numbers."""
    raw = request.query.get(name, "")
    try:
        return _query_number(request, name, None)
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
    where, args = [], []

    def add(condition: str, value: Any) -> None:
        args.append(value)
        where.append(condition.replace("?", f"${len(args)}"))

    for name, column in (("registry", "registry"), ("user", "user_id"), ("action", "action")):
        value = request.query.get(name)
        if value:
            if "\x00" in value or len(value) > 500:
                raise BadRequest(f"{name}: not a {name}")
            add(f"{column} = ?", value)
    since = _query_time(request, "since")
    until = _query_time(request, "until")
    if since is not None:
        add("ts >= ?", since)
    if until is not None:
        add("ts < ?", until)
    if request.query.get("denied_only") in ("1", "true", "yes"):
        where.append("result = 'denied'")
    limit = _query_number(request, "limit", 100) or 0  # `or 0`: limit=0 is refused below, not 100
    offset = _query_number(request, "offset", 0) or 0
    if not 1 <= limit <= 1000 or not 0 <= offset <= MAX_OFFSET:
        raise BadRequest(f"limit: 1..1000; offset: 0..{MAX_OFFSET}")
    limit, offset = int(limit), int(offset)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    db = request.app[appkeys.DATABASE]
    total = await db.fetchval(f"SELECT COUNT(*) FROM audit_log {clause}", *args)
    rows = await db.fetch(
        f"SELECT id, ts, registry, user_id, action, target, client_ip, result, detail FROM audit_log {clause}"
        f" ORDER BY id DESC LIMIT {limit} OFFSET {offset}",
        *args,
    )
    return _json({"entries": rows, "total": int(total or 0), "limit": limit, "offset": offset})


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


# --- the front page --------------------------------------------------------------------------------


def add_front_page(app: web.Application) -> None:
    app.router.add_get("/", front_page)


async def front_page(request: web.Request) -> web.Response:
    """For a browser: the registries this caller may read and how to point clients at them."""
    caller = identity(request)
    settings = request.app[appkeys.SETTINGS]
    services = request.app[appkeys.REGISTRY_SERVICES]
    readable = {r.name for r in settings.registries if has_permission(caller, r, "releases:read")}
    formats = {s.format_type.name: s.format_type for s in services.values()}
    items = []
    for guide in registry_guides(settings, formats, base_url(request), readable):
        usage = "\n".join(guide.usage)
        items.append(
            f"<section><h2>{escape(guide.name)} <small>{escape(guide.type)}, {escape(guide.mode or '')}</small></h2>"
            f"<p><code>{escape(guide.url)}</code><br>{escape(guide.upstream_line())}</p>"
            + (f"<pre>{escape(usage)}</pre>" if usage else "")
            + "</section>"
        )
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>BatleHub</title>"
        "<meta name=viewport content='width=device-width'>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#111}"
        "pre{background:#f4f4f4;padding:.75rem;overflow:auto}small{color:#555;font-weight:normal}</style>"
        f"</head><body><h1>BatleHub {escape(__version__)}</h1>"
        + ("".join(items) or "<p>No registry is readable without a token.</p>")
        + "<p>Health: <a href=/api/v1/admin/health>/api/v1/admin/health</a>. Registries as JSON:"
        " <a href=/api/v1/registries>/api/v1/registries</a>.</p></body></html>"
    )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
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
