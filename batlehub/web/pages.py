"""The web UI's pages for everyone: the package list and search, a package's page, the registries
and how to use them, signing in and out, a signed-in user's own tokens, and approving a
command-line client's sign-in (`npm login`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from batlehub import admin, appkeys
from batlehub.auth import has_permission
from batlehub.cli_login import CliLogins
from batlehub.errors import BadRequest, NotFound, Unauthorized
from batlehub.guide import registry_guides
from batlehub.package_page import README_MARKUPS, PackagePage
from batlehub.plugins import gather_hook
from batlehub.requests import base_url, identity
from batlehub.web import catalog, sessions
from batlehub.web.readme import render_readme
from batlehub.web.render import page

PAGE_SIZES = (50, 100, 1000)
TOKEN_LIFETIMES = (("30", "30 days"), ("90", "90 days"), ("365", "a year"), ("", "never"))


def package_url(registry: str, name: str, version: str | None = None) -> str:
    url = f"/packages/{quote(registry, safe='')}/{quote(name, safe='@/')}"
    return url + ("?" + urlencode({"version": version}) if version else "")


def _int(raw: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise BadRequest("expected a whole number") from None
    return min(max(value, low), high)


# --- reading ---------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    text = request.query.get("q", "").strip()[:200]
    registries = catalog.readable_registries(request)
    registry = request.query.get("registry") or None
    if registry is not None and registry not in registries:
        registry = None
    limit = _int(request.query.get("limit"), PAGE_SIZES[0], 1, PAGE_SIZES[-1])
    offset = _int(request.query.get("offset"), 0, 0, 10**9)
    found = await catalog.listing(request, text, registry, offset, limit)

    def page_link(offset: int) -> str:
        query = {"q": text, "registry": registry or "", "limit": str(limit), "offset": str(offset)}
        return "/?" + urlencode({k: v for k, v in query.items() if v and (k != "limit" or v != str(PAGE_SIZES[0]))})

    settings = request.app[appkeys.SETTINGS]
    services = request.app[appkeys.REGISTRY_SERVICES]
    formats = {s.format_type.name: s.format_type for s in services.values()}
    guides = registry_guides(settings, formats, base_url(request), set(registries))
    return await page(
        request,
        "index.html",
        text=text,
        registry=registry,
        registries=registries,
        listing=found,
        limit=limit,
        page_sizes=PAGE_SIZES,
        package_url=package_url,
        next_link=page_link(found.next_offset) if found.next_offset is not None else None,
        previous_link=page_link(found.previous_offset) if found.previous_offset is not None else None,
        guides=guides,
        anonymous_sees_nothing=not registries and identity(request).anonymous,
    )


async def package(request: web.Request) -> web.Response:
    registry_name = request.match_info["registry"]
    name = request.match_info["name"]
    version = request.query.get("version") or None
    settings = request.app[appkeys.SETTINGS]
    registry_settings = settings.registry(registry_name)
    registry = request.app[appkeys.REGISTRIES].get(registry_name)
    caller = identity(request)
    if registry_settings is None or registry is None:
        raise NotFound(f"no registry named {registry_name!r}")
    if not has_permission(caller, registry_settings, "releases:read"):
        if caller.anonymous:
            raise Unauthorized(f"sign in to read registry {registry_name!r}")
        raise NotFound(f"no registry named {registry_name!r}")
    pm = request.app[appkeys.PLUGIN_MANAGER]
    answers = await gather_hook(pm.hook.package_page(registry=registry, name=name, version=version, request=request))
    found: PackagePage | None = next((a for a in answers if a is not None), None)
    if found is None:
        raise NotFound(f"registry {registry_name!r} ({registry_settings.type}) has no package pages")
    markup = found.readme_markup if found.readme_markup in README_MARKUPS else "text"
    return await page(
        request,
        "package.html",
        registry=registry_name,
        format=registry_settings.type,
        pkg=found,
        shown=found.shown_version(),
        readme=render_readme(found.readme, markup),
        links=[(label, url) for label, url in found.links if url.startswith(("https://", "http://"))],
        dependency_groups=_groups(found),
        package_url=package_url,
        tags_of=_tags_by_version(found),
    )


def _groups(found: PackagePage) -> list[tuple[str, list[Any]]]:
    groups: dict[str, list[Any]] = {}
    for dependency in found.dependencies:
        groups.setdefault(dependency.kind, []).append(dependency)
    return sorted(groups.items(), key=lambda item: (item[0] != "", item[0]))


def _tags_by_version(found: PackagePage) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for tag, version in found.tags.items():
        tags.setdefault(version, []).append(tag)
    return tags


# --- signing in and out ----------------------------------------------------------------------------


def _next(raw: str | None) -> str:
    """Where to go after signing in: a path on this hub only (never `//elsewhere`)."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


async def login_form(request: web.Request) -> web.Response:
    csrf = sessions.login_csrf(request)
    response = await page(request, "login.html", next=_next(request.query.get("next")), error=None, form_csrf=csrf)
    sessions.remember_login_csrf(request, response, csrf)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    await sessions.check_csrf(request, fields, sign_in=True)
    token = fields.get("token", "").strip()
    found = await request.app[appkeys.AUTH].identify(token) if token and len(token) < 1000 else None
    if found is None or found.user_id is None:
        # A 401: refusals count towards IP blocking and the audit log, like any bad token.
        response = await page(
            request,
            "login.html",
            status=401,
            next=_next(fields.get("next")),
            error="That token is not valid: it may be mistyped, revoked or expired.",
            form_csrf=request.cookies.get(sessions.LOGIN_COOKIE, ""),
        )
        return response
    response = web.HTTPSeeOther(_next(fields.get("next")))
    await sessions.start(request, token, found, response)
    request[appkeys.IDENTITY] = found
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    await sessions.check_csrf(request, {k: v for k, v in form.items() if isinstance(v, str)})
    response = web.HTTPSeeOther("/")
    await sessions.end(request, response)
    raise response


# --- a user's own tokens ---------------------------------------------------------------------------


async def signed_in(request: web.Request) -> sessions.Session:
    session = await sessions.current(request)
    if session is None:
        raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
    return session


async def tokens_page(
    request: web.Request, *, created: dict[str, Any] | None = None, status: int = 200
) -> web.Response:
    session = await signed_in(request)
    mine = await request.app[appkeys.AUTH].list_tokens(session.identity.user_id)
    return await page(
        request,
        "tokens.html",
        status=status,
        tokens=mine,
        this_token=session.identity.token_id,
        created=created,
        lifetimes=TOKEN_LIFETIMES,
    )


async def my_tokens(request: web.Request) -> web.Response:
    return await tokens_page(request)


async def create_my_token(request: web.Request) -> web.Response:
    session = await signed_in(request)
    form = await _form(request)
    data: dict[str, Any] = {"description": form.get("description", "").strip()}
    if form.get("expires_in_days"):
        data["expires_in_days"] = _int(form["expires_in_days"], 90, 1, admin.MAX_TOKEN_DAYS)
    if form.get("role") in ("user", "admin"):
        data["role"] = form["role"]
    created = await admin.issue_token(request, session.identity, data, own=True)
    return await tokens_page(request, created=created, status=201)


async def revoke_my_token(request: web.Request) -> web.StreamResponse:
    session = await signed_in(request)
    await _form(request)
    await admin.revoke(request, session.identity, request.match_info["id"], own=True)
    raise web.HTTPSeeOther("/account/tokens")


async def _form(request: web.Request) -> dict[str, str]:
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    await sessions.check_csrf(request, fields)
    return fields


# --- command-line clients signing in through the browser --------------------------------------------

CLI_TOKEN_DAYS = 90


async def cli_login_form(request: web.Request) -> web.Response:
    await signed_in(request)
    pending = await CliLogins(request.app[appkeys.FAIL_OPEN_CACHE]).pending(request.match_info["id"])
    if pending is None:
        raise NotFound("This sign-in request has expired or was already answered: run the login command again.")
    return await page(request, "cli_login.html", pending=pending, outcome=None)


async def cli_login_answer(request: web.Request) -> web.Response:
    session = await signed_in(request)
    form = await _form(request)
    logins = CliLogins(request.app[appkeys.FAIL_OPEN_CACHE])
    login_id = request.match_info["id"]
    pending = await logins.pending(login_id)
    if pending is None:
        raise NotFound("This sign-in request has expired or was already answered: run the login command again.")
    if form.get("action") != "approve":
        await logins.deny(login_id)
        return await page(request, "cli_login.html", pending=pending, outcome="denied")
    description = f"{pending.client} login from {pending.client_ip or 'an unknown address'}"
    created = await admin.issue_token(
        request, session.identity, {"description": description, "expires_in_days": CLI_TOKEN_DAYS}, own=True
    )
    if not await logins.approve(login_id, created["token"]):  # answered elsewhere meanwhile
        await admin.revoke(request, session.identity, created["id"], own=True)
        raise NotFound("This sign-in request has expired or was already answered: run the login command again.")
    return await page(request, "cli_login.html", pending=pending, outcome="approved")
