"""Signing a command-line client in through the browser (`npm login --auth-type=web`, npm's
default): the client asks for a login, prints a URL on this hub, and polls until the person
signed in to the web UI approves it there; the client then gets a new token of that person.

Two random ids per login: the one in the login URL (which the person opens, and may see in their
browser history) and the one the client polls with, which never leaves the client. Both are
stored hashed, in the cache backend (so any replica can answer the poll), for ten minutes at
most. An approved login's token waits there encrypted with the polling id, so neither a copy of
the cache nor the login URL yields it; the first poll after approval takes it and ends the login.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from batlehub.coordination import FailOpenCache

LOGIN_TTL_SECS = 600.0
POLL_RETRY_SECS = 1


@dataclass(frozen=True)
class PendingLogin:
    """A login a client asked for, as the approval page shows it."""

    client: str
    """The client's name, e.g. "npm"."""
    registry: str
    client_ip: str | None
    created: float


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _keystream(secret: str, size: int) -> bytes:
    blocks = (hmac.new(secret.encode(), i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def _seal(token: str, secret: str) -> str:
    data = token.encode()
    return bytes(a ^ b for a, b in zip(data, _keystream(secret, len(data)), strict=True)).hex()


def _open(sealed: str, secret: str) -> str:
    data = bytes.fromhex(sealed)
    return bytes(a ^ b for a, b in zip(data, _keystream(secret, len(data)), strict=True)).decode()


class CliLogins:
    """Pending browser logins of command-line clients (see the module docstring)."""

    def __init__(self, cache: FailOpenCache) -> None:
        self.cache = cache

    def _login_key(self, login_id: str) -> str:
        return f"cli-login:{_digest(login_id)}"

    def _done_key(self, done_hash: str) -> str:
        return f"cli-login:done:{done_hash}"

    async def start(self, client: str, registry: str, client_ip: str | None) -> tuple[str, str]:
        """A new pending login: (the id for the login URL, the id the client polls with)."""
        login_id, done_id = secrets.token_urlsafe(24), secrets.token_urlsafe(32)
        record = {
            "client": client,
            "registry": registry,
            "ip": client_ip,
            "created": time.time(),
            "done": _digest(done_id),
        }
        await self.cache.set(self._login_key(login_id), json.dumps(record).encode(), LOGIN_TTL_SECS, 0)
        await self.cache.set(self._done_key(_digest(done_id)), b'{"state": "pending"}', LOGIN_TTL_SECS, 0)
        return login_id, done_id

    async def _record(self, login_id: str) -> dict[str, Any] | None:
        if not login_id or len(login_id) > 100:
            return None
        raw = await self.cache.get(self._login_key(login_id))
        return json.loads(raw) if raw else None

    async def pending(self, login_id: str) -> PendingLogin | None:
        """The login behind a login URL's id, while it waits for approval."""
        record = await self._record(login_id)
        if record is None:
            return None
        return PendingLogin(record["client"], record["registry"], record["ip"], float(record["created"]))

    async def approve(self, login_id: str, token: str) -> bool:
        """Hand `token` to the polling client; False when the login is gone (expired, or used)."""
        record = await self._record(login_id)
        if record is None:
            return False
        await self.cache.invalidate(self._login_key(login_id))
        sealed = {"state": "approved", "token": _seal(token, record["done"])}
        await self.cache.set(self._done_key(record["done"]), json.dumps(sealed).encode(), LOGIN_TTL_SECS, 0)
        return True

    async def deny(self, login_id: str) -> None:
        record = await self._record(login_id)
        if record is not None:
            await self.cache.invalidate(self._login_key(login_id))
            await self.cache.invalidate(self._done_key(record["done"]))

    async def poll(self, done_id: str) -> str | None:
        """The token once the login was approved (only to the first poll after), None while it
        waits. Raises `LookupError` for a login that is unknown, denied or expired."""
        if not done_id or len(done_id) > 100:
            raise LookupError("no such login")
        key = self._done_key(_digest(done_id))
        raw = await self.cache.get(key)
        if raw is None:
            raise LookupError("no such login")
        state = json.loads(raw)
        if state.get("state") != "approved":
            return None
        await self.cache.invalidate(key)
        # The stored token is sealed with the hash of the polling id, which only the client holds.
        return _open(state["token"], _digest(done_id))
