"""The request pipeline (DESIGN §8), as aiohttp middlewares, outermost first:

1. `access_log`: finds the client IP, times the request, writes one line per request, and counts
   responses in `ip_blocking.trigger_on_status` as violations of that IP.
2. `cors`: answers preflights and adds CORS headers for `server.cors_allowed_origins` (outside
   `errors`, so that a browser UI can also read the error responses: 401, 403, 429).
3. `errors`: maps domain errors (`batlehub.errors`) and aiohttp's HTTP exceptions to JSON
   `{"error": ...}`; anything unexpected becomes a logged 500.
4. `guard`: IP block (403 + `X-Block-Expires`), authentication (`request[IDENTITY]`), rate limit
   (429 + `Retry-After`, `X-RateLimit-*`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from opentelemetry import trace

from batlehub import appkeys, audit, tracing
from batlehub.auth import Identity
from batlehub.errors import BatleHubError, Forbidden, RateLimited, RequestTimeout
from batlehub.interfaces import IpBlock
from batlehub.metrics import METHODS, HubMetrics, count_ip_block
from batlehub.net import client_ip, is_trusted
from batlehub.requests import hub_app, identity, registry_of, registry_subpath

log = logging.getLogger("batlehub.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HEALTH_PATH = "/api/v1/admin/health"


def loggable_path(request: web.Request) -> str:
    """The request's raw path as logs may show it: a format can hide secrets that its clients
    put in paths (npm logout sends the token in the URL)."""
    path = request.rel_url.raw_path
    registry = registry_of(request)
    if registry is None:
        return path
    services = hub_app(request)[appkeys.REGISTRY_SERVICES].get(registry.name)
    redact = services.format_type.redact_path if services is not None else None
    if redact is None:
        return path
    sub = registry_subpath(request)
    return path[: len(path) - len(sub)] + redact(sub) if path.endswith(sub) else path


_BLOCKED = web.RequestKey("blocked", bool)
# Set when the response is a refusal that says nothing about abuse (e.g. over quota).
_NOT_A_VIOLATION = web.RequestKey("not_a_violation", bool)


REASON_MAX_CHARS = 300


def reason_phrase(message: str) -> str | None:
    """`message` as an HTTP reason phrase (one line of printable ASCII), or None for the standard
    one. Clients that print only the status line (twine, pip) then show what went wrong, as they
    do with PyPI, which answers the same way."""
    text = "".join(c if " " <= c <= "~" else " " for c in message).strip()[:REASON_MAX_CHARS]
    return text or None


def json_error(
    status: int, message: str, headers: dict[str, str] | None = None, extra: Mapping[str, Any] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        reason=reason_phrase(message),
        body=json.dumps({**(extra or {}), "error": message}).encode(),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = hub_app(request)[appkeys.SETTINGS]
    ip = client_ip(request.remote, request.headers, settings.server.trusted_proxies)
    request[appkeys.CLIENT_IP] = ip
    if not hub_app(request)[appkeys.STATE].tracing:
        return await _logged(request, handler, ip, None)
    # The client's `traceparent`, if any, makes this request's span a child of its own.
    attributes = {"http.request.method": request.method, "url.path": loggable_path(request), "client.address": ip}
    with tracing.tracer.start_as_current_span(
        request.method, context=tracing.extract(request.headers), kind=trace.SpanKind.SERVER, attributes=attributes
    ) as span:
        return await _logged(request, handler, ip, span)


async def _logged(request: web.Request, handler: Handler, ip: str, span: Any) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            # Every answer says what it is; a browser must not guess HTML out of a JSON error.
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        elapsed = time.perf_counter() - started
        trace_id = None
        if span is not None:
            route = route_of(request)
            span.update_name(f"{request.method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            trace_id = format(span.get_span_context().trace_id, "032x")
        observed = hub_app(request)[appkeys.METRICS]
        if observed is not None:
            _count(observed, request, status, elapsed, response)
        caller = identity(request)
        hub_app(request)[appkeys.ACCESS_LOG].write(
            request.method, loggable_path(request), status, elapsed * 1000, caller.user_id, ip, trace_id
        )
        if status >= 400:
            await _after_refusal(request, caller, ip, status)


def route_of(request: web.Request) -> str:
    """The route of a request as metrics and span names show it: what the registry format named
    it (`label_route`), else the pattern of the core route that matched; never the path itself."""
    named = request.get(appkeys.ROUTE)
    if named is not None:
        return named
    if registry_of(request) is not None:
        return "other"
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _count(observed: HubMetrics, request: web.Request, status: int, seconds: float, response: Any) -> None:
    registry = registry_of(request)
    method = request.method
    if method not in METHODS:
        method = "other"
    # Body bytes are known before sending for every answer but range and conditional file
    # responses; HEAD and 304 send none.
    nbytes = response.content_length if response is not None and method != "HEAD" and status != 304 else None
    if registry is None:
        series = observed.request_series("", "", route_of(request), method, status)
    else:  # `route_of` without looking for the registry again
        route = request.get(appkeys.ROUTE)
        series = observed.request_series(
            registry.name, registry.type, "other" if route is None else route, method, status
        )
    series.record(seconds, nbytes)


async def _after_refusal(request: web.Request, identity: Identity, ip: str, status: int) -> None:
    if status in (401, 403) and not request.get(_BLOCKED):
        await _audit_denied(request, identity, ip, status)
    blocking = hub_app(request)[appkeys.SETTINGS].ip_blocking
    # A request refused by a block is not a new violation: counting it would let a blocked
    # client replace an administrator's longer block with an automatic one.
    if (
        blocking.enabled
        and status in blocking.trigger_on_status
        and request.path != HEALTH_PATH
        and not request.get(_BLOCKED)
        and not request.get(_NOT_A_VIOLATION)
    ):
        await _count_violation(request, ip)


async def _audit_denied(request: web.Request, identity: Identity, ip: str, status: int) -> None:
    """Denied requests go to the audit log (requests refused by an IP block do not: a banned client
    hammering us must not turn into a database write per request). One client's refusals are
    written at most once per `HubState.denied_audits` interval per process, the row counting the
    others (a client hammering with a bad token must not be a database write per request)."""
    suppressed = hub_app(request)[appkeys.STATE].denied_audits.admit(f"{ip} {identity.user_id}")
    if suppressed is None:
        return
    registry = registry_of(request)
    try:
        await audit.record(
            hub_app(request)[appkeys.DATABASE],
            "request.denied",
            registry=registry.name if registry else None,
            user_id=identity.user_id,
            target=f"{request.method} {loggable_path(request)}"[:500],
            client_ip=ip,
            result="denied",
            detail={"status": status, "suppressed_since_last": suppressed} if suppressed else {"status": status},
        )
    except Exception:
        log.warning("could not write a denied request to the audit log", exc_info=True)


async def _count_violation(request: web.Request, ip: str) -> None:
    settings = hub_app(request)[appkeys.SETTINGS]
    if is_trusted(ip, settings.server.trusted_proxies):
        return  # a proxy we trust is never banned: that would ban everyone behind it
    blocking = settings.ip_blocking
    cache = hub_app(request)[appkeys.CACHE]
    try:
        count = await cache.record_violation(ip, blocking.violation_window_secs)
        if count < blocking.violation_threshold:
            return
        now = time.time()
        reason = f"{count} violations within {blocking.violation_window_secs:g}s"
        block = IpBlock(ip=ip, reason=reason, expires_at=now + blocking.ban_duration_secs, created_at=now)
        await cache.block_ip(block)
        hub_app(request)[appkeys.BLOCKS].put(block)
        count_ip_block("banned")
        log.warning("blocked %s for %gs after %d violations", ip, blocking.ban_duration_secs, count)
    except Exception:  # the cache being down must not turn a response into an error
        log.warning("could not record a violation for %s", ip, exc_info=True)
        return
    try:  # an automatic ban is an IP-block change like an administrator's: it goes to the audit log
        await audit.record(
            hub_app(request)[appkeys.DATABASE],
            "ip_block.add",
            target=ip,
            client_ip=ip,
            detail={"reason": reason, "duration_secs": blocking.ban_duration_secs, "automatic": True},
        )
    except Exception:
        log.warning("could not write the ban of %s to the audit log", ip, exc_info=True)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BatleHubError as exc:
        if not exc.violation:
            request[_NOT_A_VIOLATION] = True
        response = json_error(exc.status, exc.message, exc.headers, exc.body)
        if isinstance(exc, RequestTimeout):
            response.force_close()  # the rest of the body may never come: do not wait for it
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return json_error(exc.status, message.lower() if message == exc.reason else message, headers)
    except (ConnectionResetError, TimeoutError) as exc:
        if request.transport is None or request.transport.is_closing():
            raise  # the client went away; nobody to answer
        log.warning("%s %s: %s", request.method, request.path, exc)
        return json_error(503, "service temporarily unavailable")
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, "internal server error")


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    allowed = hub_app(request)[appkeys.SETTINGS].server.cors_allowed_origins
    origin = request.headers.get("Origin")
    if not origin or not allowed or ("*" not in allowed and origin not in allowed):
        return await handler(request)
    allow_origin = "*" if "*" in allowed else origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": allow_origin,
                "Access-Control-Allow-Methods": "GET, HEAD, PUT, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get(
                    "Access-Control-Request-Headers", "Authorization, Content-Type"
                ),
                "Access-Control-Max-Age": "600",
                "Vary": "Origin",
            },
        )
    response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = allow_origin
    if allow_origin != "*":  # the answer depends on the Origin: shared caches must key by it
        vary = response.headers.get("Vary")
        if vary is None:
            response.headers["Vary"] = "Origin"
        elif "origin" not in vary.lower():
            response.headers["Vary"] = f"{vary}, Origin"
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == HEALTH_PATH:
        return await handler(request)  # never blocked, never authenticated, never limited
    app = hub_app(request)
    cache = app[appkeys.FAIL_OPEN_CACHE]
    ip = request[appkeys.CLIENT_IP]
    block = app[appkeys.BLOCKS].get(ip)
    if block is not None:
        request[_BLOCKED] = True
        count_ip_block("refused")
        raise Forbidden(
            f"your address {ip} is blocked until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(block.expires_at))}",
            headers={"X-Block-Expires": str(int(block.expires_at))},
        )
    caller = await app[appkeys.AUTH].authenticate(request.headers.get("Authorization"))
    request[appkeys.IDENTITY] = caller

    registry = registry_of(request)
    limit = registry.rate_limit if registry is not None else None
    if registry is None or limit is None:
        return await handler(request)
    subject = f"user:{caller.user_id}" if caller.user_id else f"ip:{ip}"
    counted = await cache.incr_window(f"ratelimit:{registry.name}:{subject}", limit.window_secs)
    if counted is None:  # the cache backend failed (logged): limits fail open
        return await handler(request)
    reset = max(1, math.ceil(counted.reset_in_secs))
    headers = {
        "X-RateLimit-Limit": str(limit.requests_per_window),
        "X-RateLimit-Remaining": str(max(0, limit.requests_per_window - counted.count)),
        "X-RateLimit-Reset": str(reset),
    }
    observed = app[appkeys.METRICS]
    limited = counted.count > limit.requests_per_window
    if observed is not None:
        observed.rate_limit.labels(registry.name, "limited" if limited else "allowed").inc()
    if limited:
        raise RateLimited(
            f"rate limit of {limit.requests_per_window} requests per {limit.window_secs:g}s exceeded;"
            f" retry in {reset}s",
            headers={**headers, "Retry-After": str(reset)},
        )
    try:
        response = await handler(request)
    except BatleHubError as exc:
        exc.headers.update(headers)
        raise
    for key, value in headers.items():
        response.headers[key] = value
    return response


MIDDLEWARES = [access_log, cors, errors, guard]
