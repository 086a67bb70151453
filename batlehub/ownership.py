"""Admin API for package ownership, for every format (DESIGN §6 and §7):

- `GET|PUT|DELETE /api/v1/admin/registries/{registry}/owners/{package}`: the owners of a package
  name, published or not yet (`PUT {"owners": ["alice", "bob"]}` replaces them; `DELETE` clears
  them, so anyone with the publish permission may claim the name again);
- `GET|PUT|DELETE /api/v1/admin/registries/{registry}/scopes/{scope}`: the owners of a scope
  (npm `@scope`): only they publish new names in it;
- `GET /api/v1/admin/registries/{registry}/reserved` and
  `GET|PUT|DELETE /api/v1/admin/registries/{registry}/reserved/{name-or-scope}`: names kept for
  local packages (`PUT {"reason": "..."}`); a reserved name is never asked of an upstream, and may
  be published in a hybrid registry although an upstream has it.

Owners publish with their format's own client (`npm owner add/rm/ls` for npm).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from batlehub import appkeys
from batlehub.config import valid_user_id
from batlehub.errors import BadRequest, NotFound
from batlehub.registries import RegistryServices
from batlehub.requests import actor, read_json, require_admin

PREFIX = "/api/v1/admin/registries/{registry}"


def add_routes(app: web.Application) -> None:
    for kind in ("owners", "scopes"):
        route = f"{PREFIX}/{kind}/{{name:.+}}"
        app.router.add_get(route, get_owners)
        app.router.add_put(route, put_owners)
        app.router.add_delete(route, delete_owners)
    app.router.add_get(f"{PREFIX}/reserved", list_reserved)
    app.router.add_get(f"{PREFIX}/reserved/{{name:.+}}", get_reserved)
    app.router.add_put(f"{PREFIX}/reserved/{{name:.+}}", put_reserved)
    app.router.add_delete(f"{PREFIX}/reserved/{{name:.+}}", delete_reserved)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def _services(request: web.Request) -> RegistryServices:
    require_admin(request)
    name = request.match_info["registry"]
    services = request.app[appkeys.REGISTRY_SERVICES].get(name)
    if services is None:
        raise NotFound(f"no registry named {name!r}")
    return services


def _name(request: web.Request, services: RegistryServices) -> str:
    raw = request.match_info["name"]
    normalize = services.format_type.normalize_name
    if normalize is not None:
        return normalize(raw)
    if not raw or len(raw) > 256 or any(ord(c) < 32 for c in raw):
        raise BadRequest(f"invalid name {raw!r}")
    return raw


def _is_scopes(request: web.Request) -> bool:
    return "/scopes/" in request.path


async def _users(request: web.Request) -> list[str]:
    data = await read_json(request, default={})
    users = data.get("owners") if isinstance(data, dict) else None
    if not isinstance(users, list) or not users:
        raise BadRequest('owners: expected a non-empty list of user ids, e.g. {"owners": ["alice"]}')
    for user in users:
        if not valid_user_id(user):
            raise BadRequest(f"owners: {user!r} is not a user id")
    return list(dict.fromkeys(users))


async def get_owners(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    if _is_scopes(request):
        owners = await services.packages.scope_owners(name)
        return _json({"registry": services.registry.name, "scope": name, "owners": owners})
    owners = await services.packages.owners(name)
    return _json({"registry": services.registry.name, "package": name, "owners": owners})


async def put_owners(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    users = await _users(request)
    if _is_scopes(request):
        await services.packages.assign_scope_owners(name, users, actor(request))
        return _json({"registry": services.registry.name, "scope": name, "owners": users})
    await services.packages.assign_owners(name, users, actor(request))
    return _json({"registry": services.registry.name, "package": name, "owners": users})


async def delete_owners(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    if _is_scopes(request):
        await services.packages.assign_scope_owners(name, [], actor(request))
    else:
        await services.packages.assign_owners(name, [], actor(request))
    return _json({"ok": True})


async def list_reserved(request: web.Request) -> web.Response:
    services = _services(request)
    return _json({"registry": services.registry.name, "reserved": await services.packages.reserved()})


async def get_reserved(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    found = [r for r in await services.packages.reserved() if r["name"] == name]
    if not found:
        raise NotFound(f"{name} is not reserved in registry {services.registry.name!r}")
    return _json(found[0])


async def put_reserved(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    data = await read_json(request, default={})
    reason = data.get("reason", "") if isinstance(data, dict) else None
    if not isinstance(reason, str) or len(reason) > 500:
        raise BadRequest("reason: expected a string of at most 500 characters")
    await services.packages.reserve(name, reason, actor(request))
    return _json({"registry": services.registry.name, "name": name, "reason": reason}, 201)


async def delete_reserved(request: web.Request) -> web.Response:
    services = _services(request)
    name = _name(request, services)
    if not await services.packages.unreserve(name, actor(request)):
        raise NotFound(f"{name} is not reserved in registry {services.registry.name!r}")
    return _json({"ok": True})
