"""Web UI sign-in: sessions, their cookie, and CSRF checks for the UI's forms.

Signing in with a token opens a session. The cookie holds only a random session id, never the
token: a cookie can leak in ways an `.npmrc` does not (a browser profile, a debugging proxy), and
a leaked session id is worth less than a token: it dies when the session ends (sign-out, 12
hours, or its token's expiry or revocation), and it is accepted by the web UI only, never by the
API or the registries (so no cross-site request can use it against them). The database keeps a
SHA-256 of the session id and the SHA-256 the tokens table already keeps of the token, so a copy
of the table signs nobody in; the session is checked against its token on every request.

The cookie is `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends
it), `Path=/`, and `Secure` when the hub is reached over HTTPS. Every form that changes something
carries a synchronizer token bound to the session (the sign-in form, before there is a session,
a double-submit cookie), and a POST whose `Origin` or `Sec-Fetch-Site` says it came from another
site is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from batlehub import appkeys
from batlehub.auth import Identity, hash_token
from batlehub.errors import Forbidden
from batlehub.requests import base_url

SESSION_COOKIE = "batlehub_session"
LOGIN_COOKIE = "batlehub_login"
"""The sign-in form's double-submit CSRF value (there is no session to bind it to yet)."""
SESSION_SECS = 12 * 3600.0
CSRF_FIELD = "csrf_token"

_SESSION = web.RequestKey("web_session", object)


@dataclass(frozen=True)
class Session:
    id_hash: str
    identity: Identity
    token_hash: str
    csrf: str
    expires: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()


def _secure(request: web.Request) -> bool:
    return base_url(request).startswith("https://")


async def current(request: web.Request) -> Session | None:
    """This request's session, if its cookie names a live one whose token is still valid."""
    if _SESSION in request:
        found = request[_SESSION]
        return found if isinstance(found, Session) else None
    session = await _load(request)
    request[_SESSION] = session
    return session


async def _load(request: web.Request) -> Session | None:
    raw = request.cookies.get(SESSION_COOKIE)
    if not raw or len(raw) > 200:
        return None
    db = request.app[appkeys.DATABASE]
    id_hash = _digest(raw)
    row = await db.fetchrow("SELECT id_hash, token_hash, csrf, expires FROM web_sessions WHERE id_hash = $1", id_hash)
    if row is None or not hmac.compare_digest(row["id_hash"], id_hash) or row["expires"] < time.time():
        return None
    identity = await request.app[appkeys.AUTH].identify_digest(row["token_hash"])
    if identity is None:  # the token was revoked or expired: so is every session it opened
        await db.execute("DELETE FROM web_sessions WHERE id_hash = $1", id_hash)
        return None
    return Session(id_hash, identity, row["token_hash"], row["csrf"], float(row["expires"]))


async def start(request: web.Request, token: str, identity: Identity, response: web.StreamResponse) -> Session:
    """Open a session for `identity` (who presented `token`) and set its cookie on `response`.

    A new id every time: a session id planted before sign-in is never promoted (fixation)."""
    db = request.app[appkeys.DATABASE]
    now = time.time()
    await db.execute("DELETE FROM web_sessions WHERE expires < $1", now)
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        await db.execute("DELETE FROM web_sessions WHERE id_hash = $1", _digest(old))
    session_id = secrets.token_urlsafe(32)
    token_hash = hash_token(token)
    expires = now + SESSION_SECS
    row = await db.fetchrow("SELECT expires FROM tokens WHERE token_hash = $1", token_hash)
    if row is not None and row["expires"] is not None:
        expires = min(expires, float(row["expires"]))
    session = Session(_digest(session_id), identity, token_hash, secrets.token_urlsafe(32), expires)
    await db.execute(
        "INSERT INTO web_sessions (id_hash, token_hash, csrf, created, expires) VALUES ($1, $2, $3, $4, $5)",
        session.id_hash,
        token_hash,
        session.csrf,
        now,
        expires,
    )
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=max(1, int(expires - now)),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )
    response.del_cookie(LOGIN_COOKIE, path="/")
    request[_SESSION] = session
    return session


async def end(request: web.Request, response: web.StreamResponse) -> None:
    session = await current(request)
    if session is not None:
        await request.app[appkeys.DATABASE].execute("DELETE FROM web_sessions WHERE id_hash = $1", session.id_hash)
    request[_SESSION] = None
    response.del_cookie(SESSION_COOKIE, path="/")


def login_csrf(request: web.Request) -> str:
    """The sign-in form's CSRF value: the one its cookie holds, else a new one (which
    `remember_login_csrf` sets)."""
    value = request.cookies.get(LOGIN_COOKIE, "")
    return value if 32 <= len(value) <= 100 else secrets.token_urlsafe(32)


def remember_login_csrf(request: web.Request, response: web.StreamResponse, value: str) -> None:
    if request.cookies.get(LOGIN_COOKIE) != value:
        response.set_cookie(
            LOGIN_COOKIE, value, path="/", httponly=True, samesite="Strict", secure=_secure(request), max_age=3600
        )


def check_origin(request: web.Request) -> None:
    """Refuse a state change that a page of another site sent (defence beside the CSRF token)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden("this form must be sent from the hub's own pages")
    origin = request.headers.get("Origin")
    # The host only: behind a TLS proxy the hub may see http while the browser says https.
    if origin is not None and urlsplit(origin).netloc != urlsplit(base_url(request)).netloc:
        raise Forbidden("this form must be sent from the hub's own pages")


async def check_csrf(request: web.Request, form: Mapping[str, str], *, sign_in: bool = False) -> None:
    """The form's CSRF token must match its session's (for the sign-in form, its cookie's)."""
    check_origin(request)
    sent = form.get(CSRF_FIELD, "")
    session = None if sign_in else await current(request)
    expected = session.csrf if session is not None else (request.cookies.get(LOGIN_COOKIE, "") if sign_in else "")
    if not sent or not expected or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("the form has expired or did not come from this site; reload the page and try again")
