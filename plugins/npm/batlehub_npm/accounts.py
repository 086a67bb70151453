"""The npm endpoints around packages: who am I, login and logout with tokens, the user lookup
that `npm owner add` makes, and audit forwarding."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from batlehub.api import (
    BadRequest,
    BatleHubError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    base_url,
    client_ip,
    gunzip,
    identity,
    read_body,
    read_json,
    registry_url,
    require,
)
from batlehub_npm.documents import json_response as _json
from batlehub_npm.names import Route, parse_package_name

if TYPE_CHECKING:
    from batlehub.api import RegistryServices
    from batlehub_npm.local import LocalPackages
    from batlehub_npm.upstream import UpstreamProxy

AUDIT_BODY_LIMIT = 8 * 1024 * 1024
"""An audit body, compressed or not: the dependency tree of a very large project fits well within."""
_GZIP_MAGIC = b"\x1f\x8b"


async def whoami(request: web.Request, route: Route) -> web.StreamResponse:
    caller = identity(request)
    if caller.anonymous:
        raise Unauthorized(
            "not logged in: put a token for this registry in your .npmrc (//HOST/registries/NAME/:_authToken=...)",
            headers={"WWW-Authenticate": 'Bearer realm="batlehub"'},
        )
    return _json({"username": caller.user_id})


async def ping(request: web.Request, route: Route) -> web.StreamResponse:
    return _json({})


async def stars(request: web.Request, route: Route) -> web.StreamResponse:
    raise NotFound("stars are not kept by this registry, so there are none to list")


class Accounts:
    """The endpoints that need the registry's services: logins, logouts, user lookups, audit."""

    def __init__(self, services: RegistryServices, proxy: UpstreamProxy | None, local: LocalPackages) -> None:
        self.services = services
        self.proxy = proxy
        self.local = local

    async def web_login(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`npm login` (web, npm's default): npm prints `loginUrl`, where the person approves the
        login in the hub's web UI, and polls `doneUrl` until the token is there."""
        services = self.services
        login_id, done_id = await services.cli_logins.start("npm", services.registry.name, client_ip(request))
        return _json(
            {
                "loginUrl": f"{base_url(request)}/login/cli/{login_id}",
                "doneUrl": f"{registry_url(request)}/-/v1/done?authId={done_id}",
            }
        )

    async def web_login_done(self, request: web.Request, route: Route) -> web.StreamResponse:
        try:
            token = await self.services.cli_logins.poll(request.query.get("authId", ""))
        except LookupError:
            raise Forbidden("this login was denied or has expired: run npm login again") from None
        if token is None:
            return web.Response(status=202, body=b"{}", content_type="application/json", headers={"Retry-After": "1"})
        return _json({"token": token})

    async def login(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`npm login` with a user name and password: the "password" must be an access token of
        that user (core's `token_login`); the client then stores it as its auth token."""
        name = route.extra or ""
        body = await read_json(request)
        if not isinstance(body, Mapping):
            raise BadRequest("the login body must be a JSON object")
        token = await self.services.tokens.token_login(
            name, body.get("password"), elsewhere=", or put the token in your .npmrc"
        )
        return _json({"ok": True, "id": f"org.couchdb.user:{name}", "token": token}, status=201)

    async def user_lookup(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`GET /-/user/org.couchdb.user:{name}`, which `npm owner add` asks before adding an
        owner. Users exist through their tokens; only someone who may publish may ask."""
        require(request, "releases:publish")
        name = route.extra or ""
        if not name or not await self.services.tokens.user_exists(name):
            raise NotFound(f"no user {name!r} (users exist through their access tokens)")
        return _json({"_id": f"org.couchdb.user:{name}", "name": name, "email": ""})

    async def logout(self, request: web.Request, route: Route) -> web.StreamResponse:
        """`npm logout`: revoke the database token the client logged in with (core's `log_out`)."""
        await self.services.tokens.log_out(identity(request), route.extra or "")
        return _json({"ok": True, "revoked": True})

    async def audit(self, request: web.Request, route: Route) -> web.StreamResponse:
        """npm audit: forwarded to the first upstream, without the names of local packages."""
        require(request, "releases:read")
        sub = route.extra or ""
        try:
            body = await read_body(request, AUDIT_BODY_LIMIT)
        except PayloadTooLarge:
            raise PayloadTooLarge(f"audit request is larger than {AUDIT_BODY_LIMIT} bytes") from None
        if self.proxy is None:
            return _json(_EMPTY_QUICK_AUDIT if sub.startswith("audits") else {})
        # aiohttp has undone a declared Content-Encoding already; gzip bytes left are npm's own.
        headers = {"Content-Type": "application/json"}
        if body[:2] == _GZIP_MAGIC:
            headers["Content-Encoding"] = "gzip"
        if sub == "advisories/bulk":
            body = await _without_local_names(body, self.local)
        status, content_type, answer = await self.proxy.audit(sub, body, headers)
        if content_type.split(";")[0].strip().lower() != "application/json":
            # Never serve an upstream's HTML (or anything else) from the hub's own origin: keep its
            # refusal (npm shows "404 Not Found" for an upstream without an audit service), say ours.
            return _json(
                {"error": f"the upstream registry answered {status} for audit, without JSON"},
                status=status if 400 <= status < 600 else 502,
            )
        return web.Response(status=status, body=answer, content_type="application/json")


async def _without_local_names(body: bytes, local: LocalPackages) -> bytes:
    """Local package names are private: never tell an upstream which ones we have."""
    gzipped = body[:2] == _GZIP_MAGIC
    data = await asyncio.to_thread(_decode_audit, body, gzipped)
    kept = {}
    for name, versions in data.items():
        try:
            is_local = await local.stamp(parse_package_name(name).name) is not None
        except BatleHubError:
            is_local = False
        if not is_local:
            kept[name] = versions
    return await asyncio.to_thread(_encode_audit, kept, gzipped)


def _decode_audit(body: bytes, gzipped: bool) -> dict[str, Any]:
    """The audit body as an object; gunzipped within `AUDIT_BODY_LIMIT` (a gzip bomb stops there)."""
    if gzipped:
        body = gunzip(body, AUDIT_BODY_LIMIT, "audit request")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("audit request body is not (gzip-compressed) JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("audit request body must be an object of name -> versions")
    return data


def _encode_audit(data: dict[str, Any], gzipped: bool) -> bytes:
    raw = json.dumps(data).encode()
    return gzip.compress(raw) if gzipped else raw


_EMPTY_QUICK_AUDIT = {
    "actions": [],
    "advisories": {},
    "muted": [],
    "metadata": {
        "vulnerabilities": {"info": 0, "low": 0, "moderate": 0, "high": 0, "critical": 0},
        "dependencies": 0,
        "devDependencies": 0,
        "optionalDependencies": 0,
        "totalDependencies": 0,
    },
}
