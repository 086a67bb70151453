"""What a handler needs to know about the request in front of it: who asks, from where, in which
registry, may they, and under which URL this hub is seen.

The middleware pipeline fills in the client IP and the identity; everything here reads them back.
A registry's routes live in a sub-application mounted at `REGISTRY_MOUNT`; aiohttp resolves the
sub-application before any middleware runs, so `registry_of` finds the registry through the
matched applications instead of parsing the path again.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

from aiohttp import web

from batlehub import appkeys, jsondoc
from batlehub.auth import ANONYMOUS, Identity, check_permission
from batlehub.config import RegistrySettings
from batlehub.errors import (
    BadRequest,
    BatleHubError,
    Forbidden,
    InvalidKey,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
)
from batlehub.net import is_trusted

if TYPE_CHECKING:
    from batlehub.coordination import FailOpenCache

H = TypeVar("H")

REGISTRY_MOUNT = "/registries/{name}/"
"""Where each registry's routes are mounted (the only place the prefix is spelled)."""

SMALL_BODY_LIMIT = 1024 * 1024
"""Default bound for JSON request bodies that are not publishes (logins, tags, admin calls)."""


@dataclass(frozen=True)
class Actor:
    """Who does a write, for permission checks, ownership and the audit log."""

    identity: Identity
    client_ip: str | None = None

    @property
    def user_id(self) -> str | None:
        return self.identity.user_id

    @property
    def is_admin(self) -> bool:
        return self.identity.role == "admin"


def identity(request: web.Request) -> Identity:
    """The authenticated caller (ANONYMOUS without a token)."""
    found: Identity = request.get(appkeys.IDENTITY, ANONYMOUS)
    return found


def client_ip(request: web.Request) -> str | None:
    """The client's address, forwarding headers believed only from `server.trusted_proxies`."""
    ip: str | None = request.get(appkeys.CLIENT_IP)
    return ip


def actor(request: web.Request) -> Actor:
    return Actor(identity(request), client_ip(request))


def hub_app(request: web.Request) -> web.Application:
    """The hub's own (root) application, where every `appkeys` value but the registry's lives.
    Read through this rather than `request.config_dict`, which aiohttp builds anew on each access
    (nine per request added up to several percent of a cached document's CPU)."""
    return request.match_info.apps[0]


_REGISTRY: web.RequestKey[tuple[RegistrySettings | None]] = web.RequestKey("batlehub_registry", tuple)
_BASE_URL = web.RequestKey("batlehub_base_url", str)


def registry_of(request: web.Request) -> RegistrySettings | None:
    """The registry whose routes matched this request, or None outside every registry."""
    known = request.get(_REGISTRY)
    if known is not None:
        return known[0]
    found = None
    # The matched applications, not `config_dict`: while the root's middlewares run, aiohttp makes
    # the root the current application, and its config_dict stops there.
    for app in request.match_info.apps:
        registry = app.get(appkeys.REGISTRY_SETTINGS)
        if registry is not None:
            found = registry
            break
    request[_REGISTRY] = (found,)
    return found


def label_route(request: web.Request, name: str) -> None:
    """Name the route this request took ("packument", "tarball", "publish"...), for the metrics
    and the trace span of the request. A format whose routes are not separate aiohttp routes
    (one catch-all that parses paths itself) calls this; names must come from a small fixed set,
    never from the path (no package names)."""
    request[appkeys.ROUTE] = name


def require(request: web.Request, permission: str) -> Identity:
    """Check `permission` for the caller in this request's registry; return the caller.

    Raises `Unauthorized` (no token) or `Forbidden` (a token without the permission)."""
    registry = registry_of(request)
    if registry is None:
        raise RuntimeError("require() called outside a registry's routes")
    caller = identity(request)
    check_permission(caller, registry, permission)
    return caller


def require_admin(request: web.Request) -> Identity:
    caller = identity(request)
    if caller.anonymous:
        raise Unauthorized("authentication required", headers={"WWW-Authenticate": 'Bearer realm="batlehub"'})
    if caller.role != "admin":
        raise Forbidden("admin role required")
    return caller


def base_url(request: web.Request) -> str:
    """This hub's base URL as the client sees it, without a trailing slash: `server.public_url`
    if set, else the request's scheme (trusted `X-Forwarded-Proto`) and host."""
    known = request.get(_BASE_URL)
    if known is not None:
        return known
    settings = hub_app(request)[appkeys.SETTINGS]
    if settings.server.public_url:
        url = settings.server.public_url.rstrip("/")
    else:
        scheme = request.scheme
        host = request.host
        if is_trusted(request.remote, settings.server.trusted_proxies):
            proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                scheme = proto
            fwd_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            if fwd_host:
                host = fwd_host
        url = f"{scheme}://{host}"
    request[_BASE_URL] = url
    return url


def registry_path(name: str) -> str:
    """The path prefix of a registry's routes, with its trailing slash."""
    return REGISTRY_MOUNT.format(name=name)


_MOUNT_SEGMENTS = REGISTRY_MOUNT.strip("/").count("/") + 1


def registry_subpath(request: web.Request) -> str:
    """The raw (still percent-encoded) path below the registry's mount point, with its leading
    `/`: what a format parses itself when its names may contain encoded slashes."""
    parts = request.rel_url.raw_path.split("/", _MOUNT_SEGMENTS + 1)
    return "/" + parts[_MOUNT_SEGMENTS + 1] if len(parts) > _MOUNT_SEGMENTS + 1 else "/"


def registry_url(request: web.Request, name: str | None = None) -> str:
    """The absolute URL of a registry (this request's by default), without a trailing slash."""
    if name is None:
        registry = registry_of(request)
        if registry is None:
            raise RuntimeError("registry_url() called outside a registry's routes")
        name = registry.name
    return base_url(request) + registry_path(name).rstrip("/")


def route_handler(routes: Mapping[tuple[str, str], H], kind: str, request: web.Request, path: str, what: str) -> H:
    """The handler of a format's own route table, keyed by (route kind, method), for this
    request (HEAD is served as GET): 404 naming `what` for a kind the table lacks, 405 with the
    `Allow` header for a method it lacks. For formats that parse their raw paths themselves."""
    handler = routes.get((kind, "GET" if request.method == "HEAD" else request.method))
    if handler is not None:
        return handler
    allowed = sorted({method for known, method in routes if known == kind})
    if not allowed:
        raise NotFound(f"no such {what}: {request.method} {path}")
    raise MethodNotAllowed(
        f"{request.method} is not supported here (allowed: {', '.join(allowed)})",
        headers={"Allow": ", ".join(allowed)},
    )


_CONTROL_OR_BACKSLASH = re.compile(r"[\x00-\x1f\x7f\\]")


def refuse_path_escape(text: str, what: str) -> None:
    """Refuse text from a URL that could walk out of a namespace once it names a row or a storage
    key (`..`, a leading `.`-pair, control characters, backslashes, a `%` left after decoding),
    whatever else is wrong with it: 400 naming the text as `what`."""
    if _CONTROL_OR_BACKSLASH.search(text):
        raise InvalidKey(f"invalid {what} {text!r}: control characters and backslashes are not allowed")
    for part in text.split("/"):
        if part in (".", "..") or part.startswith(".."):
            raise InvalidKey(f"invalid {what} {text!r}: path traversal is not allowed")
    if "%" in text:  # left over after decoding once: double-encoded, never a real name
        raise InvalidKey(f"invalid {what} {text!r}: percent signs are not allowed")


def decode_path_segment(raw: str) -> str:
    """One raw (percent-encoded) path segment decoded once, strictly as UTF-8 (`UnicodeDecodeError`
    otherwise); NUL and backslash are refused with a 400."""
    text = unquote(raw, errors="strict")
    if "\x00" in text or "\\" in text:
        raise InvalidKey("invalid path: NUL and backslash are not allowed")
    return text


def body_reader(request: web.Request) -> Callable[[], Awaitable[bytes]]:
    """`request.content.readany`, answered 408 when the client sends nothing for
    `limits.body_idle_timeout_secs` (a stalled upload must not hold a connection forever)."""
    idle = hub_app(request)[appkeys.SETTINGS].limits.body_idle_timeout_secs
    content = request.content

    async def read() -> bytes:
        try:
            async with asyncio.timeout(idle):
                return await content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"no request body bytes for {idle:g}s; closing (limits.body_idle_timeout_secs)"
            ) from None

    return read


async def read_body(request: web.Request, limit: int = SMALL_BODY_LIMIT) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    read = body_reader(request)
    body = bytearray()
    while chunk := await read():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    return bytes(body)


async def read_json(request: web.Request, limit: int = SMALL_BODY_LIMIT, *, default: Any = None) -> Any:
    """The request body as JSON (`default` for an empty body); 400 for anything that is not JSON."""
    body = await read_body(request, limit)
    if not body:
        return default
    return parse_json(body)


def gunzip(body: bytes, limit: int, what: str) -> bytes:
    """`body` (gzip) uncompressed: 400 when it is not gzip, 413 as soon as it passes `limit`
    bytes (a gzip bomb stops there). `what` names the body in messages ("audit request")."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        raw = inflate.decompress(body, limit + 1)
    except zlib.error:
        raise BadRequest(f"{what} body is not valid gzip") from None
    if len(raw) > limit or inflate.unconsumed_tail:
        raise PayloadTooLarge(f"{what} is larger than {limit} bytes uncompressed")
    return raw


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON (`batlehub.jsondoc.loads`): no NaN or Infinity, no lone surrogates, no
    absurd nesting; anything else is a 400."""
    return jsondoc.loads(raw)


def rfc3339(epoch: float) -> str:
    """A time as the admin API answers it: RFC 3339, UTC, milliseconds (`2026-12-02T16:25:21.250Z`)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def epoch_of(value: Any) -> float | None:
    """An ISO 8601 time from a document (`2026-12-02T16:25:21.250Z`; without a zone, UTC) as epoch
    seconds, or None when it is missing or unreadable: what formats read from upstream documents,
    where a bad time must not stop the rest."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def banner_header(cache: FailOpenCache, header: str) -> Any:
    """Middleware for a format's application: the global banner rides on each of its responses,
    errors too, as `header` (npm prints `npm-notice`); a handler's own value of it wins."""

    @web.middleware
    async def add_banner(request: web.Request, handler: Any) -> web.StreamResponse:
        banner = await cache.get_banner()
        notice = " ".join(banner.message.split()) if banner is not None and banner.message else None
        try:
            response: web.StreamResponse = await handler(request)
        except BatleHubError as exc:
            if notice:
                exc.headers.setdefault(header, notice)
            raise
        if notice and not response.prepared:
            response.headers.setdefault(header, notice)
        return response

    return add_banner
