"""The web UI's admin pages: health of each backend, the banner, IP blocks, tokens, quota usage,
the audit log, the policies and the plugins. Every change goes through the same function as the
admin API (`batlehub.admin`, `batlehub.policy_rules`), so it is checked and audited the same way."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from batlehub import admin, appkeys, policy_admin, quota
from batlehub.errors import BadRequest, BatleHubError, Forbidden, NotFound
from batlehub.guide import registry_guides
from batlehub.plugins import describe_plugins
from batlehub.policy_config import format_duration
from batlehub.policy_rules import KINDS, new_rule
from batlehub.requests import actor, base_url
from batlehub.web import sessions
from batlehub.web.pages import TOKEN_LIFETIMES, signed_in
from batlehub.web.render import page

AUDIT_PAGE = 50
BAN_DURATIONS = (("3600", "1 hour"), ("86400", "1 day"), ("604800", "1 week"), ("2592000", "30 days"))


async def _admin(request: web.Request) -> sessions.Session:
    session = await signed_in(request)
    if session.identity.role != "admin":
        raise Forbidden("these pages are for admins")
    return session


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    await sessions.check_csrf(request, fields)
    return fields


async def overview(request: web.Request) -> web.Response:
    await _admin(request)
    report, code = await admin.health_report(request.app)
    settings = request.app[appkeys.SETTINGS]
    services = request.app[appkeys.REGISTRY_SERVICES]
    formats = {s.format_type.name: s.format_type for s in services.values()}
    replicas = await request.app[appkeys.DATABASE].fetch(
        "SELECT host, pid, started, last_seen FROM replicas WHERE last_seen > $1 ORDER BY started", time.time() - 60
    )
    return await page(
        request,
        "admin/overview.html",
        section="overview",
        health=report,
        healthy=code == 200,
        guides=registry_guides(settings, formats, base_url(request)),
        modes={r.name: admin.registry_mode(r) for r in settings.registries},
        cache_type=settings.cache.get("type", "memory"),
        storage_type=settings.storage.get("type", "filesystem"),
        database_type=settings.database.type,
        replicas=replicas,
    )


# --- banner ----------------------------------------------------------------------------------------


async def banner_form(request: web.Request) -> web.Response:
    await _admin(request)
    return await page(request, "admin/banner.html", section="banner", levels=admin.BANNER_LEVELS)


async def set_banner(request: web.Request) -> web.StreamResponse:
    session = await _admin(request)
    form = await _form(request)
    if form.get("action") == "clear":
        await admin.clear_banner(request, session.identity)
    else:
        await admin.set_banner(
            request, session.identity, {"message": form.get("message", "").strip(), "level": form.get("level", "info")}
        )
    raise web.HTTPSeeOther("/admin/banner")


# --- IP blocks -------------------------------------------------------------------------------------


async def ip_blocks(request: web.Request) -> web.Response:
    await _admin(request)
    blocks = sorted(await request.app[appkeys.CACHE].list_blocks(), key=lambda b: b.created_at)
    return await page(
        request,
        "admin/ip_blocks.html",
        section="ip-blocks",
        blocks=blocks,
        durations=BAN_DURATIONS,
        settings=request.app[appkeys.SETTINGS].ip_blocking,
    )


async def add_ip_block(request: web.Request) -> web.StreamResponse:
    session = await _admin(request)
    form = await _form(request)
    reason = form.get("reason", "").strip() or "blocked by an administrator"
    data: dict[str, Any] = {"ip": form.get("ip", "").strip(), "reason": reason}
    if form.get("duration_secs", "").isdigit():
        data["duration_secs"] = int(form["duration_secs"])
    await admin.add_block(request, session.identity, data)
    raise web.HTTPSeeOther("/admin/ip-blocks")


async def lift_ip_block(request: web.Request) -> web.StreamResponse:
    session = await _admin(request)
    form = await _form(request)
    await admin.lift_block(request, session.identity, form.get("ip", ""))
    raise web.HTTPSeeOther("/admin/ip-blocks")


# --- tokens ----------------------------------------------------------------------------------------


async def tokens(request: web.Request, *, created: dict[str, Any] | None = None, status: int = 200) -> web.Response:
    session = await _admin(request)
    return await page(
        request,
        "admin/tokens.html",
        section="tokens",
        status=status,
        tokens=await request.app[appkeys.AUTH].list_tokens(),
        this_token=session.identity.token_id,
        created=created,
        lifetimes=TOKEN_LIFETIMES,
        now=time.time(),
    )


async def tokens_page(request: web.Request) -> web.Response:
    return await tokens(request)


async def create_token(request: web.Request) -> web.Response:
    session = await _admin(request)
    form = await _form(request)
    data: dict[str, Any] = {
        "user_id": form.get("user_id", "").strip(),
        "role": form.get("role", "user"),
        "description": form.get("description", "").strip(),
    }
    if form.get("expires_in_days", "").isdigit():
        data["expires_in_days"] = int(form["expires_in_days"])
    created = await admin.issue_token(request, session.identity, data)
    return await tokens(request, created=created, status=201)


async def revoke_token(request: web.Request) -> web.StreamResponse:
    session = await _admin(request)
    await _form(request)
    await admin.revoke(request, session.identity, request.match_info["id"])
    raise web.HTTPSeeOther("/admin/tokens")


# --- quota, audit log, plugins ---------------------------------------------------------------------


async def quota_page(request: web.Request) -> web.Response:
    await _admin(request)
    settings = request.app[appkeys.SETTINGS]
    limits = {r.name: r.quota for r in settings.registries}
    rows = await quota.all_usage(request.app[appkeys.DATABASE])
    return await page(request, "admin/quota.html", section="quota", rows=rows, limits=limits)


async def audit_page(request: web.Request) -> web.Response:
    await _admin(request)
    query = {k: v for k, v in request.query.items() if v}
    query["limit"] = str(AUDIT_PAGE)
    found = await admin.audit_entries(request.app, query)
    offset = found["offset"]

    def link(to: int) -> str:
        return "/admin/audit?" + urlencode({**{k: v for k, v in query.items() if k != "limit"}, "offset": str(to)})

    return await page(
        request,
        "admin/audit.html",
        section="audit",
        entries=found["entries"],
        total=found["total"],
        offset=offset,
        filters=request.query,
        registries=[r.name for r in request.app[appkeys.SETTINGS].registries],
        next_link=link(offset + AUDIT_PAGE) if offset + AUDIT_PAGE < found["total"] else None,
        previous_link=link(max(0, offset - AUDIT_PAGE)) if offset > 0 else None,
    )


async def plugins_page(request: web.Request) -> web.Response:
    await _admin(request)
    infos = describe_plugins(request.app[appkeys.PLUGIN_MANAGER])
    return await page(request, "admin/plugins.html", section="plugins", plugins=infos)


# --- policies --------------------------------------------------------------------------------------

RULE_LIFETIMES = (("", "never"), ("1", "1 day"), ("7", "7 days"), ("30", "30 days"), ("90", "90 days"))


def _registry_policies(request: web.Request) -> list[dict[str, Any]]:
    """Each registry's policies and gate settings, as the admin API's overview reports them."""
    found = []
    for name, services in request.app[appkeys.REGISTRY_SERVICES].items():
        config = services.registry.policy
        found.append(
            {
                "name": name,
                "format": services.format_type.name,
                "policies": [p.name for p in services.policy.policies],
                "min_release_age": format_duration(config.min_release_age) if config else None,
                "missing_time": config.missing_time if config else None,
                "gate_local": config.gate_local if config else None,
                "age": [(o.package, format_duration(o.min_release_age)) for o in (config.age if config else ())],
            }
        )
    return found


async def policies(
    request: web.Request,
    *,
    status: int = 200,
    error: str | None = None,
    form: dict[str, str] | None = None,
    why: dict[str, Any] | None = None,
    why_error: str | None = None,
) -> web.Response:
    await _admin(request)
    book = request.app[appkeys.POLICY_RULES]
    revision = await book.revision()
    registries = _registry_policies(request)
    rules = book.list()
    query = {k: request.query.get(k, "") for k in ("registry", "package", "version")}
    return await page(
        request,
        "admin/policies.html",
        section="policies",
        status=status,
        registries=registries,
        rules={r["name"]: [rule for rule in rules if rule.registry == r["name"]] for r in registries},
        revision=revision,
        counters=request.app[appkeys.POLICY_STATS].snapshot(),
        kinds=KINDS,
        lifetimes=RULE_LIFETIMES,
        error=error,
        form=form or {},
        why=why,
        why_error=why_error,
        why_query=query,
        added_rule=book.find(request.query.get("added", "")) if request.query.get("added") else None,
    )


async def policies_page(request: web.Request) -> web.Response:
    """The policies, and what the "why" form asked (a GET: it changes nothing, and its answer can
    be linked to)."""
    await _admin(request)
    registry, package, version = (request.query.get(k, "").strip() for k in ("registry", "package", "version"))
    if not (registry or package or version):
        return await policies(request)
    try:
        if not (registry and package and version):
            raise BadRequest("give the registry, the package and the version to explain")
        answer = await policy_admin.explain(request.app, registry, package, version)
    except BatleHubError as exc:
        if exc.status >= 500:
            raise
        return await policies(request, status=exc.status, why_error=exc.message)
    return await policies(request, why=answer)


async def add_policy_rule(request: web.Request) -> web.StreamResponse:
    session = await _admin(request)
    form = await _form(request)
    book = request.app[appkeys.POLICY_RULES]
    data: dict[str, Any] = {k: form.get(k, "") for k in ("registry", "package", "versions", "reason")}
    data["versions"] = data["versions"].strip() or "*"
    if form.get("expires", "").strip():
        data["expires"] = form["expires"].strip()
    if form.get("expires_in_days", "").isdigit():
        data["expires_in_days"] = int(form["expires_in_days"])
    try:
        kind = form.get("kind", "")
        if kind not in KINDS:
            raise BadRequest(f"kind: expected one of {', '.join(KINDS)}")
        # The admin API's own check and write: the same messages, the same audit entry.
        rule = new_rule(data, kind=kind, formats=book.formats, author=session.identity.user_id, now=time.time())
        await book.add(rule, actor(request))
    except BatleHubError as exc:
        if exc.status >= 500:
            raise
        return await policies(request, status=exc.status, error=exc.message, form=form)
    raise web.HTTPSeeOther(f"/admin/policies?added={rule.id}#rules-{rule.registry}")


async def delete_policy_rule(request: web.Request) -> web.StreamResponse:
    await _admin(request)
    await _form(request)
    book = request.app[appkeys.POLICY_RULES]
    await book.revision()
    rule = book.find(request.match_info["id"])
    try:
        if rule is None:
            raise NotFound(f"no policy rule {request.match_info['id']!r}; it may have been deleted already")
        await book.remove(rule, actor(request))
    except BatleHubError as exc:
        if exc.status >= 500:
            raise
        return await policies(request, status=exc.status, error=exc.message)
    raise web.HTTPSeeOther(f"/admin/policies#rules-{rule.registry}")
