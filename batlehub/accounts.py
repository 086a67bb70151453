"""A signed-in user's own tokens, for every user (not only admins):

- `GET /api/v1/tokens`: the caller's live tokens (never their secrets);
- `POST /api/v1/tokens` `{"description", "expires_in_days", "role"}`: a new token for the caller,
  with their role unless they ask for `"user"`; the secret is in the answer, once;
- `DELETE /api/v1/tokens/{id}`: revoke one of the caller's tokens (404 for anyone else's).

Users exist through their tokens, so these are how a user rotates theirs without an admin. Tokens
from the configuration are the operator's: they are neither listed nor revocable here.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from batlehub import admin, appkeys
from batlehub.errors import Unauthorized
from batlehub.requests import identity


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/tokens", list_own_tokens)
    app.router.add_post("/api/v1/tokens", create_own_token)
    app.router.add_delete("/api/v1/tokens/{id}", revoke_own_token)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(data).encode(), status=status, content_type="application/json")


def _signed_in(request: web.Request) -> str:
    caller = identity(request)
    if caller.user_id is None:
        raise Unauthorized("authentication required", headers={"WWW-Authenticate": 'Bearer realm="batlehub"'})
    return caller.user_id


async def list_own_tokens(request: web.Request) -> web.Response:
    user_id = _signed_in(request)
    tokens = await request.app[appkeys.AUTH].list_tokens(user_id)
    return _json({"user_id": user_id, "tokens": [admin.token_json(t) for t in tokens]})


async def create_own_token(request: web.Request) -> web.Response:
    _signed_in(request)
    data = await admin.read_object(request)
    return _json(await admin.issue_token(request, identity(request), data, own=True), 201)


async def revoke_own_token(request: web.Request) -> web.Response:
    _signed_in(request)
    await admin.revoke(request, identity(request), request.match_info["id"], own=True)
    return _json({"ok": True})
