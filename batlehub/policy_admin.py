"""Admin API of policies (DESIGN §7), for every registry and format:

- `GET /api/v1/admin/policies`: each registry's policies and gate settings, every rule in force,
  the rules' revision and the counters of what was withheld and refused;
- `GET|POST /api/v1/admin/policies/{blocks|allows|exemptions}` and
  `GET|DELETE /api/v1/admin/policies/{blocks|allows|exemptions}/{id}`: the rules. A body is
  `{"registry", "package", "versions", "reason", "expires" | "expires_in_days"}`; the author is
  the caller. Every change holds on every replica within a second (`batlehub.policy_rules`);
- `GET /api/v1/admin/why/{registry}/{package}/{version}`: which rule decides a version, and what
  every policy said about it.

Bad input is a 400 that names the field; nothing a caller sends is a 5xx.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from batlehub import appkeys
from batlehub.errors import BadRequest, NotFound
from batlehub.policy_config import format_duration
from batlehub.policy_rules import ROUTE_KINDS, PolicyRule, new_rule
from batlehub.registries import RegistryServices
from batlehub.requests import actor, read_json, require_admin

PREFIX = "/api/v1/admin/policies"


def add_routes(app: web.Application) -> None:
    app.router.add_get(PREFIX, overview)
    app.router.add_get(f"{PREFIX}/{{kind}}", list_rules)
    app.router.add_post(f"{PREFIX}/{{kind}}", add_rule)
    app.router.add_get(f"{PREFIX}/{{kind}}/{{id}}", get_rule)
    app.router.add_delete(f"{PREFIX}/{{kind}}/{{id}}", delete_rule)
    app.router.add_get("/api/v1/admin/why/{registry}/{package:.+}/{version}", why)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def _kind(request: web.Request) -> str:
    kind = ROUTE_KINDS.get(request.match_info["kind"])
    if kind is None:
        raise NotFound(f"no such list: {request.match_info['kind']!r} (known: {', '.join(ROUTE_KINDS)})")
    return kind


async def overview(request: web.Request) -> web.Response:
    require_admin(request)
    book = request.app[appkeys.POLICY_RULES]
    revision = await book.revision()
    registries = {}
    for name, services in request.app[appkeys.REGISTRY_SERVICES].items():
        config = services.registry.policy
        registries[name] = {
            "policies": [p.name for p in services.policy.policies],
            "min_release_age": format_duration(config.min_release_age) if config else None,
            "missing_time": config.missing_time if config else None,
            "gate_local": config.gate_local if config else None,
            "age": [
                {"package": o.package, "min_release_age": format_duration(o.min_release_age)}
                for o in (config.age if config else ())
            ],
        }
    now = time.time()
    return _json(
        {
            "revision": revision,
            "registries": registries,
            "rules": [r.to_json(now) for r in book.list()],
            "counters": request.app[appkeys.POLICY_STATS].snapshot(),
        }
    )


async def list_rules(request: web.Request) -> web.Response:
    require_admin(request)
    kind = _kind(request)
    book = request.app[appkeys.POLICY_RULES]
    await book.revision()
    registry = request.query.get("registry") or None
    expired = request.query.get("expired") in ("1", "true", "yes")
    now = time.time()
    return _json({"rules": [r.to_json(now) for r in book.list(registry=registry, kind=kind, expired=expired)]})


async def add_rule(request: web.Request) -> web.Response:
    admin = require_admin(request)
    kind = _kind(request)
    data = await read_json(request, 65536, default=None)
    if not isinstance(data, dict):
        raise BadRequest(
            'request body must be a JSON object, e.g. {"registry": "npm", "package": "left-pad",'
            ' "versions": ">=1.3.0", "reason": "compromised release"}'
        )
    book = request.app[appkeys.POLICY_RULES]
    rule = new_rule(data, kind=kind, formats=book.formats, author=admin.user_id, now=time.time())
    await book.add(rule, actor(request))
    return _json(rule.to_json(), 201)


async def _rule(request: web.Request) -> PolicyRule:
    """The rule the path names, as the rules stand now on any replica."""
    require_admin(request)
    kind = _kind(request)
    book = request.app[appkeys.POLICY_RULES]
    await book.revision()
    rule = book.find(request.match_info["id"])
    if rule is None or rule.kind != kind:
        raise NotFound(f"no {kind} rule {request.match_info['id']!r}")
    return rule


async def get_rule(request: web.Request) -> web.Response:
    return _json((await _rule(request)).to_json())


async def delete_rule(request: web.Request) -> web.Response:
    rule = await _rule(request)
    await request.app[appkeys.POLICY_RULES].remove(rule, actor(request))
    return _json({"ok": True, "rule": rule.rule_id})


async def why(request: web.Request) -> web.Response:
    require_admin(request)
    match = request.match_info
    return _json(await explain(request.app, match["registry"], unquote(match["package"]), unquote(match["version"])))


async def explain(app: web.Application, registry: str, package: str, version: str) -> dict[str, Any]:
    """Which rule decides `package@version` in `registry` (the why endpoint and the admin page)."""
    if not version or len(version) > 256 or not version.isprintable():
        raise BadRequest(f"invalid version {version!r}")
    services = _registry_services(app, registry)
    normalize = services.format_type.normalize_name
    return await services.policy.explain(normalize(package) if normalize is not None else package, version)


def _services(request: web.Request) -> RegistryServices:
    return _registry_services(request.app, request.match_info["registry"])


def _registry_services(app: web.Application, name: str) -> RegistryServices:
    services = app[appkeys.REGISTRY_SERVICES].get(name)
    if services is None:
        raise NotFound(f"no registry named {name!r}")
    return services
