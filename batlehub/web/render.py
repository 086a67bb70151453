"""Pages from templates: the Jinja2 environment (autoescaped), the context every page shares (who
is signed in, the banner, the CSRF token), the security headers every page carries, and the
hub's own static files.

The Content-Security-Policy allows scripts, styles and images from the hub only (images also as
`data:`): no inline script or style, so markup that slipped past the README sanitizer still could
not run. Pages work without JavaScript; the one script adds copy buttons.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from batlehub import __version__, appkeys
from batlehub.requests import identity
from batlehub.web import sessions

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png", ".svg": "image/svg+xml"}


def security_headers(private: bool) -> dict[str, str]:
    return {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
        # A signed-in page (tokens, the audit log) must not stay in a shared or back-button cache.
        "Cache-Control": "no-store" if private else "no-cache",
    }


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("batlehub.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = format_time
    env.filters["size"] = format_size
    env.filters["iso"] = iso_time
    env.globals["static"] = static_url
    env.globals["version"] = __version__
    return env


@cache
def static_files() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, content type, short digest), read once from the package."""
    files = {}
    for entry in resources.files("batlehub.web").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in STATIC_TYPES:
            data = entry.read_bytes()
            files[entry.name] = (data, STATIC_TYPES[suffix], hashlib.sha256(data).hexdigest()[:12])
    return files


def static_url(name: str) -> str:
    """The file's URL with its digest, so a new release's CSS is never served from an old cache."""
    return f"/static/{name}?v={static_files()[name][2]}"


async def static(request: web.Request) -> web.Response:
    found = static_files().get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    data, content_type, digest = found
    headers = {"Cache-Control": "public, max-age=31536000, immutable", "ETag": f'"{digest}"'}
    if request.headers.get("If-None-Match") == headers["ETag"]:
        return web.Response(status=304, headers=headers)
    return web.Response(body=data, content_type=content_type, headers=headers)


async def page(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """Render `template` with the shared context; the response carries the security headers."""
    session = await sessions.current(request)
    viewer = identity(request)
    banner = await request.app[appkeys.FAIL_OPEN_CACHE].get_banner()
    shared = {
        "viewer": viewer,
        "session": session,
        "csrf_token": session.csrf if session is not None else "",
        "banner": banner,
        "path": request.path,
        "path_qs": request.path_qs,
    }
    body = environment().get_template(template).render({**shared, **context})
    return web.Response(
        text=body, status=status, content_type="text/html", headers=security_headers(not viewer.anonymous)
    )


def format_time(epoch: float | None) -> str:
    if epoch is None or not math.isfinite(epoch) or epoch <= 0:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def iso_time(epoch: float | None) -> str:
    if epoch is None or not math.isfinite(epoch) or epoch <= 0:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
