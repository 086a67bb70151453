"""The web UI, served by the hub itself at `/` (unless `server.static_dir` serves another one):
server-side pages from Jinja2 templates, one CSS file and one small script, all shipped in this
package, nothing loaded from elsewhere and no build step.

- `/`: every package the caller may read, in every registry and format, local and proxied,
  searched and paged; below, each registry's URL and client set-up.
- `/packages/{registry}/{name}`: a package's page, from its format's `package_page` hook.
- `/login`, `/logout`: sign in with a token (a session cookie, see `sessions`).
- `/account/tokens`: a signed-in user's own tokens: create, revoke.
- `/login/cli/{id}`: approve a command-line client's sign-in (`npm login`, see `batlehub.cli_login`).
- `/admin/...`: health, banner, IP blocks, tokens, quota usage, audit log, policies, plugins.

Reading works without JavaScript and without signing in (as far as each registry's RBAC lets
anonymous callers read). Errors are HTML pages with the status the API would answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from batlehub import appkeys
from batlehub.errors import BatleHubError, NotFound
from batlehub.web import admin_pages, pages, sessions
from batlehub.web.render import page, static

log = logging.getLogger("batlehub.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ui(handler: Handler) -> Handler:
    """A page handler as the browser needs it: the session's identity in place of the request's
    (the cookie is honoured here only), and domain errors as HTML pages."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            session = await sessions.current(request)
            if session is not None:
                request[appkeys.IDENTITY] = session.identity
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return await _error_page(request, exc.status, exc.reason)
        except BatleHubError as exc:
            response = await _error_page(request, exc.status, exc.message)
            for key, value in exc.headers.items():
                if key.lower() != "www-authenticate":  # a browser would pop up its own sign-in box
                    response.headers[key] = value
            return response

    return wrapped


async def _error_page(request: web.Request, status: int, message: str) -> web.Response:
    return await page(request, "error.html", status=status, status_code=status, message=message)


def add_routes(app: web.Application) -> None:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/", pages.index),
        ("GET", "/packages/{registry}/{name:.+}", pages.package),
        ("GET", "/login", pages.login_form),
        ("POST", "/login", pages.login),
        ("POST", "/logout", pages.logout),
        ("GET", "/account/tokens", pages.my_tokens),
        ("POST", "/account/tokens", pages.create_my_token),
        ("POST", "/account/tokens/{id}/revoke", pages.revoke_my_token),
        ("GET", "/login/cli/{id}", pages.cli_login_form),
        ("POST", "/login/cli/{id}", pages.cli_login_answer),
        ("GET", "/admin", admin_pages.overview),
        ("GET", "/admin/banner", admin_pages.banner_form),
        ("POST", "/admin/banner", admin_pages.set_banner),
        ("GET", "/admin/ip-blocks", admin_pages.ip_blocks),
        ("POST", "/admin/ip-blocks", admin_pages.add_ip_block),
        ("POST", "/admin/ip-blocks/lift", admin_pages.lift_ip_block),
        ("GET", "/admin/tokens", admin_pages.tokens_page),
        ("POST", "/admin/tokens", admin_pages.create_token),
        ("POST", "/admin/tokens/{id}/revoke", admin_pages.revoke_token),
        ("GET", "/admin/quota", admin_pages.quota_page),
        ("GET", "/admin/audit", admin_pages.audit_page),
        ("GET", "/admin/policies", admin_pages.policies_page),
        ("POST", "/admin/policies/rules", admin_pages.add_policy_rule),
        ("POST", "/admin/policies/rules/{id}/delete", admin_pages.delete_policy_rule),
        ("GET", "/admin/plugins", admin_pages.plugins_page),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, ui(handler))
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/{tail:.*}", _unknown)


async def _unknown(request: web.Request) -> web.StreamResponse:
    if request.path.startswith(("/api/", "/registries/")):
        raise NotFound("not found")  # the API and the registries answer JSON, even here
    return await ui(_not_found)(request)


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise NotFound("There is no page here.")
