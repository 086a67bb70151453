"""Authentication (tokens from the config and from the database) and permission checks.

Tokens are never stored or logged in plaintext: config tokens may be given as `sha256:<hex>`,
database tokens are stored as their SHA-256. Presented tokens are hashed and compared with
`hmac.compare_digest`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batlehub.errors import Forbidden, StartupError, Unauthorized

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings, Settings
    from batlehub.db import Database

log = logging.getLogger(__name__)

TOKEN_PREFIX = "bh_"
FIRST_START_DESCRIPTION = "first-start admin token"
FIRST_START_TOKEN_ID = "first-start-admin"
LAST_USED_RESOLUTION_SECS = 60.0
"""`last_used` is written at most once a minute per token, not on every request (a database write
per request would cost more than the answer is worth to an operator)."""


@dataclass(frozen=True)
class Identity:
    """Who is asking. `user_id` is None for anonymous requests."""

    user_id: str | None
    role: str
    token_id: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.user_id is None


ANONYMOUS = Identity(user_id=None, role="anonymous")


def hash_token(token: str) -> str:
    # A header with bytes that are not UTF-8 arrives as surrogate escapes: hash them as the bytes
    # they were (such a token matches nothing, and must not fail with a 500).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_from_header(header: str | None) -> str | None:
    """The token in `Authorization: Bearer <token>` or `Basic base64(user:<token>)`, else None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        _, sep, password = decoded.partition(":")
        if not sep or not password:
            raise Unauthorized("malformed Basic credentials")
        return password
    raise Unauthorized(f"unsupported authorization scheme {scheme!r}; use Bearer or Basic")


class Authenticator:
    """Turns a presented token into an `Identity`."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.db = db
        # hash -> (role, user_id). Plaintext config tokens are hashed at start and forgotten.
        self._config_tokens: dict[str, tuple[str, str]] = {}
        for auth in settings.auth:
            for entry in auth.tokens:
                digest = entry.value[7:].lower() if entry.value.startswith("sha256:") else hash_token(entry.value)
                self._config_tokens[digest] = (entry.role, entry.user_id)

    async def authenticate(self, authorization: str | None) -> Identity:
        """The identity for an `Authorization` header; ANONYMOUS without one.

        Raises `Unauthorized` for a token that is unknown, revoked or expired: a client that sends
        a bad credential is told so rather than silently treated as anonymous.
        """
        token = token_from_header(authorization)
        if token is None:
            return ANONYMOUS
        identity = await self.identify(token)
        if identity is None:
            raise Unauthorized("invalid or expired token")
        return identity

    async def identify(self, token: str) -> Identity | None:
        return await self.identify_digest(hash_token(token))

    async def identify_digest(self, digest: str) -> Identity | None:
        """The identity of the token whose SHA-256 is `digest`, if it is live (a web session
        keeps only the digest of the token it was signed in with)."""
        for known, (role, user_id) in self._config_tokens.items():
            if hmac.compare_digest(known, digest):
                return Identity(user_id=user_id, role=role)
        row = await self.db.fetchrow(
            "SELECT id, token_hash, user_id, role, expires, revoked, last_used FROM tokens WHERE token_hash = $1",
            digest,
        )
        if row is None or not hmac.compare_digest(row["token_hash"], digest):
            return None
        now = time.time()
        if row["revoked"] or (row["expires"] is not None and row["expires"] < now):
            return None
        identity = Identity(user_id=row["user_id"], role=row["role"], token_id=row["id"])
        if row["last_used"] is None or row["last_used"] < now - LAST_USED_RESOLUTION_SECS:
            await self.touch(identity)
        return identity

    async def touch(self, identity: Identity) -> None:
        """Record `last_used` for a database token (best effort: a failed write never refuses a
        request that authenticated fine)."""
        if not identity.token_id:
            return
        try:
            await self.db.execute("UPDATE tokens SET last_used = $1 WHERE id = $2", time.time(), identity.token_id)
        except Exception:
            log.warning("could not record the last use of token %s", identity.token_id, exc_info=True)

    async def create_token(
        self,
        user_id: str,
        role: str,
        expires_in_days: float | None = None,
        description: str = "",
        *,
        token: str | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Create a database token (`token`, or a new random one); return its public record and
        the plaintext (shown once)."""
        token = token or new_token()
        now = time.time()
        record = {
            "id": uuid.uuid4().hex,
            "user_id": user_id,
            "role": role,
            "created": now,
            "expires": now + expires_in_days * 86400 if expires_in_days else None,
            "last_used": None,
            "description": description,
        }
        await self.db.execute(
            "INSERT INTO tokens (id, token_hash, user_id, role, created, expires, description)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            record["id"],
            hash_token(token),
            user_id,
            role,
            now,
            record["expires"],
            description,
        )
        return record, token

    async def list_tokens(self, user_id: str | None = None) -> list[dict[str, Any]]:
        """Live database tokens (not revoked; expired ones too, so an operator sees them), all
        of them or `user_id`'s."""
        columns = "SELECT id, user_id, role, created, expires, last_used, description FROM tokens WHERE revoked = 0"
        if user_id is None:
            return await self.db.fetch(columns + " ORDER BY created")
        return await self.db.fetch(columns + " AND user_id = $1 ORDER BY created", user_id)

    async def revoke_token(self, token_id: str, user_id: str | None = None) -> bool:
        """Revoke a database token (only if it is `user_id`'s, when given); True if it was live."""
        if user_id is None:
            return await self.db.execute("UPDATE tokens SET revoked = 1 WHERE id = $1 AND revoked = 0", token_id) > 0
        revoked = await self.db.execute(
            "UPDATE tokens SET revoked = 1 WHERE id = $1 AND user_id = $2 AND revoked = 0", token_id, user_id
        )
        return revoked > 0

    async def user_exists(self, user_id: str) -> bool:
        """Whether any configured or live database token belongs to `user_id` (users exist only
        through their tokens)."""
        if any(uid == user_id for _, uid in self._config_tokens.values()):
            return True
        row = await self.db.fetchrow(
            "SELECT 1 AS hit FROM tokens WHERE user_id = $1 AND revoked = 0"
            " AND (expires IS NULL OR expires > $2) LIMIT 1",
            user_id,
            time.time(),
        )
        return row is not None

    async def revoke_presented(self, caller: Identity, token: str) -> bool:
        """Revoke `token` if it is the database token `caller` authenticated with (`npm logout`)."""
        if caller.token_id is None:
            return False
        revoked = await self.db.execute(
            "UPDATE tokens SET revoked = 1 WHERE id = $1 AND token_hash = $2 AND revoked = 0",
            caller.token_id,
            hash_token(token),
        )
        return revoked > 0

    async def token_login(self, user_id: str, password: Any, *, elsewhere: str = "") -> str:
        """A client's password login (`npm login`): BatleHub has no passwords, so the password
        must be a live access token of `user_id`; the client then keeps it as its token. Returns
        it, or raises `Unauthorized`; `elsewhere` ends that message with where else the client
        takes a token (", or put the token in your .npmrc")."""
        found = await self.identify(password) if isinstance(password, str) and password else None
        if found is None or found.user_id is None:
            raise Unauthorized(
                "BatleHub has no passwords: log in with your user id and an access token as the password" + elsewhere
            )
        if found.user_id != user_id:
            raise Unauthorized(f"that token belongs to another user; log in as {found.user_id!r}")
        return str(password)

    async def log_out(self, caller: Identity, token: str) -> None:
        """A client's logout (`npm logout`): revoke the database token `caller` authenticated with,
        and only that one, which the client names as `token`. Tokens from the configuration cannot
        be revoked from outside: that is a 403, not a success while the token keeps working."""
        if caller.anonymous:
            raise Unauthorized("not logged in")
        if caller.token_id is None:
            raise Forbidden("this token comes from the server's configuration and cannot be revoked by logging out")
        if not await self.revoke_presented(caller, token):
            raise Forbidden("only the token used for this request can be revoked")

    async def ensure_first_start_token(self, data_dir: Path) -> Path | None:
        """With no tokens configured and no first-start token ever made, create an admin token and
        write it to `<data_dir>/admin.token` (mode 0600). Returns the path when one was created.

        The row has a fixed id, so replicas starting together create one token between them, and
        an operator who revoked it does not get it back at the next start.
        """
        if self._config_tokens:
            return None
        token, path = new_token(), data_dir / "admin.token"
        created = await self.db.execute(
            "INSERT INTO tokens (id, token_hash, user_id, role, created, description)"
            " VALUES ($1, $2, 'admin', 'admin', $3, $4) ON CONFLICT (id) DO NOTHING",
            FIRST_START_TOKEN_ID,
            hash_token(token),
            time.time(),
            FIRST_START_DESCRIPTION,
        )
        if not created:
            return None
        try:
            _write_secret(path, token)
        except OSError as exc:
            # Nobody could ever read this token: forget it, so the next start tries again.
            await self.db.execute("DELETE FROM tokens WHERE id = $1", FIRST_START_TOKEN_ID)
            raise StartupError(
                f"cannot write the first-start admin token to {path}: {exc.strerror or exc}"
                " (check --data-dir / BATLEHUB_DATA_DIR, or configure [[auth]] tokens)"
            ) from exc
        return path


def _write_secret(path: Path, secret: str) -> Path:
    """Write `secret` to `path`, readable by its owner only (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    os.chmod(path, 0o600)
    return path


def has_permission(identity: Identity, registry: RegistrySettings, permission: str) -> bool:
    # A scraper's token must not see less than no token at all: role "metrics" reads like anonymous.
    role = "anonymous" if identity.role == "metrics" else identity.role
    granted = registry.rbac.get(role, ())
    return "*" in granted or permission in granted


def check_permission(identity: Identity, registry: RegistrySettings, permission: str) -> None:
    """Raise `Unauthorized` (no token) or `Forbidden` (a token without the permission)."""
    if has_permission(identity, registry, permission):
        return
    if identity.anonymous:
        raise Unauthorized(
            f"authentication required to {_verb(permission)} in registry {registry.name!r}",
            headers={"WWW-Authenticate": 'Basic realm="batlehub"'},
        )
    raise Forbidden(f"user {identity.user_id!r} may not {_verb(permission)} in registry {registry.name!r}")


def _verb(permission: str) -> str:
    return {
        "releases:read": "read packages",
        "source:read": "download artifacts",
        "releases:publish": "publish",
        "releases:delete": "unpublish or delete",
    }.get(permission, permission)
