"""Block, allow and exemption rules: kept in the database, read from memory, the same on every
replica within a second.

Rules come from two places: `[[registries.policy.block]]` / `.allow` in the configuration (fixed
for the life of the process) and the admin API (table `policy_rules`). Every change through the
API bumps one counter, `policy_revision`, in the same transaction as the change and its audit
entry, then mirrors it into the cache backend. Each process reads that key at most every
`REFRESH_SECS` on the request path and reloads the rules when it moved, so a rule added on one
replica holds on all of them within a second; if the cache backend lost the write (or is down),
the database answers after `REVISION_TTL_SECS` at the latest.

Decisions that depend on rules are cached against the revision (`batlehub.policies`), so a
request pays one comparison, not a rule lookup.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from batlehub import audit
from batlehub.coordination import FailOpenCache, LogThrottle
from batlehub.errors import BadRequest, Conflict, NotFound
from batlehub.policy_config import (
    MAX_REASON,
    ConfigRule,
    check_pattern,
    check_range,
    is_glob,
    iso,
    name_matcher,
    parse_time,
    version_matcher,
)

if TYPE_CHECKING:
    from batlehub.config import RegistrySettings
    from batlehub.db import Database
    from batlehub.interfaces import RegistryFormatType
    from batlehub.requests import Actor

log = logging.getLogger(__name__)

KINDS = ("block", "allow", "exempt")
"""Rule kinds; each is also the `Verdict.action` its matches produce."""
ROUTE_KINDS = {"blocks": "block", "allows": "allow", "exemptions": "exempt"}
"""The admin API's plural paths (`/api/v1/admin/policies/blocks`) and the kind each holds."""
REFRESH_SECS = 0.5
"""How often a process asks the cache backend whether the rules changed: a change made on any
replica holds everywhere within this (plus one cache round trip)."""
REVISION_TTL_SECS = 5.0
"""How long the mirrored revision is believed without the database (a cache that dropped the
write of a change delays it by at most this)."""
REVISION_KEY = "policy:revision"
MAX_DAYS = 36500


@dataclass(frozen=True)
class PolicyRule:
    """One block, allow or exemption rule."""

    id: str
    registry: str
    kind: str
    package: str
    """A name, a scope (`@corp`) or a glob (`@corp/*`)."""
    versions: str
    """A range in the format's syntax, or `*`."""
    reason: str
    author: str | None
    created: float
    expires: float | None
    source: str = "api"
    """"api" (kept in the database) or "config" (from `[registries.policy]`, read-only)."""

    @property
    def rule_id(self) -> str:
        """What verdicts name as their rule: `block/3f9a0c1d2e4b`."""
        return f"{self.kind}/{self.id}"

    def in_force(self, now: float) -> bool:
        return self.expires is None or self.expires > now

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "id": self.id,
            "rule": self.rule_id,
            "registry": self.registry,
            "kind": self.kind,
            "package": self.package,
            "versions": self.versions,
            "reason": self.reason,
            "author": self.author,
            "created": iso(self.created),
            "expires": iso(self.expires),
            "expired": not self.in_force(now),
            "source": self.source,
        }


@dataclass(frozen=True)
class RuleMatcher:
    rule: PolicyRule
    names: Callable[[str], bool]
    versions: Callable[[str], bool]
    every_version: bool


@dataclass
class RegistryRules:
    """One registry's rules in force, indexed so that "does any rule name this package" costs a
    dictionary lookup (plus one regular expression per glob rule)."""

    by_name: dict[str, list[RuleMatcher]] = field(default_factory=dict)
    """Exact names and scopes (`@corp`)."""
    globs: list[RuleMatcher] = field(default_factory=list)
    scope_of: Callable[[str], str | None] = lambda name: None

    def add(self, matcher: RuleMatcher) -> None:
        if is_glob(matcher.rule.package):
            self.globs.append(matcher)
        else:
            self.by_name.setdefault(matcher.rule.package, []).append(matcher)

    def matching(self, package: str) -> list[RuleMatcher]:
        """The rules naming `package` (expired ones too: check `rule.in_force(now)`), oldest first."""
        found = list(self.by_name.get(package, ()))
        scope = self.scope_of(package)
        if scope is not None and scope != package:
            found += self.by_name.get(scope, ())
        found += [m for m in self.globs if m.names(package)]
        if len(found) > 1:
            found.sort(key=lambda m: (m.rule.source != "config", m.rule.created, m.rule.id))
        return found

    def __bool__(self) -> bool:
        return bool(self.by_name or self.globs)


class LiveRules:
    """One registry's rules as a policy holds them: always the ones last loaded by the book."""

    def __init__(self, book: RuleBook, registry: str) -> None:
        self.book = book
        self.registry = registry

    def matching(self, package: str) -> list[RuleMatcher]:
        return self.book.rules(self.registry).matching(package)

    def __bool__(self) -> bool:
        return bool(self.book.rules(self.registry))


class RuleBook:
    """Every registry's rules (see the module docstring). One per application."""

    def __init__(
        self,
        *,
        db: Database,
        cache: FailOpenCache,
        formats: Mapping[str, RegistryFormatType],
        config_rules: Mapping[str, list[PolicyRule]] | None = None,
    ) -> None:
        self.db = db
        self.cache = cache
        self.formats = dict(formats)
        """Registry name -> its format (for names, scopes and version ranges)."""
        self.config_rules = {name: list(rules) for name, rules in (config_rules or {}).items()}
        self._stored: list[PolicyRule] = []
        self._by_registry: dict[str, RegistryRules] = {}
        self._revision: int | None = None
        self._loaded_revision = 0
        self._checked = float("-inf")
        self._refreshing: asyncio.Task[int] | None = None
        self._warnings = LogThrottle()
        self._index()

    # --- reading ------------------------------------------------------------------------------

    def rules(self, registry: str) -> RegistryRules:
        """The registry's rules as last loaded (call `revision()` first on a request path)."""
        return self._by_registry.setdefault(registry, RegistryRules())

    async def revision(self) -> int:
        """The current revision of the rules, reloading them when another replica changed them.
        At most one cache read per `REFRESH_SECS` per process; concurrent callers share it."""
        if self._revision is not None and time.monotonic() - self._checked < REFRESH_SECS:
            return self._revision
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> int:
        raw = await self.cache.get(REVISION_KEY)
        revision: int | None = None
        if raw is not None:
            try:
                revision = int(raw)
            except ValueError:
                revision = None
        try:
            if revision is None:
                revision = await self._db_revision()
                await self.cache.set(REVISION_KEY, str(revision).encode(), ttl_secs=REVISION_TTL_SECS)
            if self._revision is None or revision != self._loaded_revision:
                # The database says what the revision is: a cache that is behind it (a lost write)
                # or holds another deployment's value costs a reload per check, never a stale rule.
                await self._load()
        except Exception as exc:
            # Proxied documents are served while the database is down (from the cache and the
            # upstreams): keep applying the rules last loaded rather than failing every request.
            if self._warnings("refresh"):
                log.warning("cannot reload the policy rules from the database (%s); applying the last loaded", exc)
        self._revision = self._loaded_revision
        self._checked = time.monotonic()
        return self._revision

    async def _db_revision(self) -> int:
        return int(await self.db.fetchval("SELECT revision FROM policy_revision WHERE id = 1") or 0)

    async def _load(self) -> None:
        async with self.db.snapshot() as conn:
            self._loaded_revision = int(await conn.fetchval("SELECT revision FROM policy_revision WHERE id = 1") or 0)
            rows = await conn.fetch(
                "SELECT id, registry, kind, package, versions, reason, author, created, expires"
                " FROM policy_rules ORDER BY created, id"
            )
        self._stored = [_rule_of(row) for row in rows]
        self._index()

    def _index(self) -> None:
        now = time.time()
        indexed: dict[str, RegistryRules] = {}
        for registry, fmt in self.formats.items():
            indexed[registry] = RegistryRules(scope_of=fmt.scope_of or (lambda name: None))
        for rule in [*(r for rules in self.config_rules.values() for r in rules), *self._stored]:
            found = self.formats.get(rule.registry)
            if found is None or not rule.in_force(now - 86400):
                continue  # a registry no longer configured, or a rule long expired
            fmt = found
            try:
                versions = version_matcher(rule.versions, fmt.version_range)
            except ValueError:
                log.warning(
                    "policy rule %s: %r is no longer a valid version range; ignored", rule.rule_id, rule.versions
                )
                continue
            indexed[rule.registry].add(
                RuleMatcher(
                    rule=rule,
                    names=name_matcher(rule.package, fmt.scope_of),
                    versions=versions,
                    every_version=rule.versions.strip() in ("", "*"),
                )
            )
        self._by_registry = indexed

    def list(self, *, registry: str | None = None, kind: str | None = None, expired: bool = False) -> list[PolicyRule]:
        """Rules as last loaded, config rules first, then by creation."""
        now = time.time()
        rules = [*(r for rs in self.config_rules.values() for r in rs), *self._stored]
        return [
            r
            for r in rules
            if (registry is None or r.registry == registry)
            and (kind is None or r.kind == kind)
            and (expired or r.in_force(now))
        ]

    def find(self, rule_id: str) -> PolicyRule | None:
        for rule in [*(r for rs in self.config_rules.values() for r in rs), *self._stored]:
            if rule.id == rule_id:
                return rule
        return None

    # --- writing ------------------------------------------------------------------------------

    async def add(self, rule: PolicyRule, actor: Actor) -> PolicyRule:
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO policy_rules (id, registry, kind, package, versions, reason, author, created, expires)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                rule.id,
                rule.registry,
                rule.kind,
                rule.package,
                rule.versions,
                rule.reason,
                rule.author,
                rule.created,
                rule.expires,
            )
            revision = await self._bump(conn, rule, actor, "add")
        await self._changed(revision)
        return rule

    async def remove(self, rule: PolicyRule, actor: Actor) -> None:
        if rule.source != "api":
            raise Conflict(
                f"rule {rule.rule_id} is written in the configuration ([registries.policy] of {rule.registry!r});"
                " remove it there"
            )
        async with self.db.transaction() as conn:
            removed = await conn.execute("DELETE FROM policy_rules WHERE id = $1", rule.id)
            if not removed:
                raise NotFound(f"no policy rule {rule.rule_id}")
            revision = await self._bump(conn, rule, actor, "remove")
        await self._changed(revision)

    async def _bump(self, conn: Any, rule: PolicyRule, actor: Actor, change: str) -> int:
        """The new revision, and the change's audit entry, in the change's transaction."""
        await conn.execute("UPDATE policy_revision SET revision = revision + 1 WHERE id = 1")
        revision = int(await conn.fetchval("SELECT revision FROM policy_revision WHERE id = 1"))
        await audit.record(
            conn,
            f"policy.{rule.kind}.{change}",
            registry=rule.registry,
            user_id=actor.user_id,
            target=f"{rule.package}@{rule.versions}",
            client_ip=actor.client_ip,
            detail={**rule.to_json(), "revision": revision},
        )
        return revision

    async def _changed(self, revision: int) -> None:
        """Tell every replica (through the cache backend), and this process at once."""
        await self.cache.set(REVISION_KEY, str(revision).encode(), ttl_secs=REVISION_TTL_SECS)
        await self._load()
        self._revision = self._loaded_revision
        self._checked = time.monotonic()


def _rule_of(row: Mapping[str, Any]) -> PolicyRule:
    return PolicyRule(
        id=str(row["id"]),
        registry=str(row["registry"]),
        kind=str(row["kind"]),
        package=str(row["package"]),
        versions=str(row["versions"]),
        reason=str(row["reason"]),
        author=row["author"],
        created=float(row["created"]),
        expires=float(row["expires"]) if row["expires"] is not None else None,
    )


# --- building rules from input ---------------------------------------------------------------------


def new_rule(
    data: Mapping[str, Any],
    *,
    kind: str,
    formats: Mapping[str, RegistryFormatType],
    author: str | None,
    now: float,
) -> PolicyRule:
    """A rule from an admin API body; `BadRequest` naming the field for anything wrong."""
    known = {"registry", "package", "versions", "reason", "expires", "expires_in_days"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    registry = data.get("registry")
    if not isinstance(registry, str) or registry not in formats:
        raise BadRequest(f"registry: expected the name of a registry, one of: {', '.join(sorted(formats)) or 'none'}")
    fmt = formats[registry]
    try:
        package = check_pattern(data.get("package"), fmt.normalize_name)
    except ValueError as exc:
        raise BadRequest(f"package: {exc}") from None
    except BadRequest as exc:
        raise BadRequest(f"package: {exc.message}") from None
    try:
        versions = check_range(data.get("versions", "*"), fmt.version_range)
    except ValueError as exc:
        raise BadRequest(f"versions: {exc}") from None
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON or not reason.isprintable():
        raise BadRequest(f"reason: expected a single line of 1 to {MAX_REASON} characters saying why")
    expires = _expiry(data, now)
    if kind == "exempt" and expires is None:
        raise BadRequest('expires: an exemption needs an expiry ("expires": "2027-01-31" or "expires_in_days": 7)')
    return PolicyRule(
        id=secrets.token_hex(6),
        registry=registry,
        kind=kind,
        package=package,
        versions=versions,
        reason=reason.strip(),
        author=author,
        created=now,
        expires=expires,
    )


def _expiry(data: Mapping[str, Any], now: float) -> float | None:
    if data.get("expires") is not None and data.get("expires_in_days") is not None:
        raise BadRequest("expires, expires_in_days: give one of them, not both")
    days = data.get("expires_in_days")
    if days is not None:
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= MAX_DAYS:
            raise BadRequest(f"expires_in_days: expected a positive number up to {MAX_DAYS}")
        return now + float(days) * 86400
    raw = data.get("expires")
    if raw is None:
        return None
    try:
        expires = parse_time(raw)
    except ValueError as exc:
        raise BadRequest(f"expires: {exc}") from None
    if expires <= now:
        raise BadRequest(f"expires: {iso(expires)} is in the past")
    if expires > now + MAX_DAYS * 86400:
        raise BadRequest("expires: more than 100 years ahead; leave it out for a rule that does not expire")
    return expires


def config_rules(registry: RegistrySettings, fmt: RegistryFormatType, path: str) -> tuple[list[PolicyRule], list[str]]:
    """The rules of a registry's `[registries.policy]`, and the problems of each (by key path)."""
    policy = registry.policy
    rules: list[PolicyRule] = []
    problems: list[str] = []
    if policy is None:
        return rules, problems
    for kind, entries in (("block", policy.block), ("allow", policy.allow)):
        for index, entry in enumerate(entries):
            where = f"{path}.policy.{kind}[{index}]"
            rule = _config_rule(entry, kind, registry.name, fmt, where, problems)
            if rule is not None:
                rules.append(replace(rule, id=f"config-{registry.name}-{kind}-{index}"))
    for index, override in enumerate(policy.age):
        try:
            check_pattern(override.package, fmt.normalize_name)
        except ValueError as exc:
            problems.append(f"{path}.policy.age[{index}].package: {exc}")
        except BadRequest as exc:
            problems.append(f"{path}.policy.age[{index}].package: {exc.message}")
    return rules, problems


def _config_rule(
    entry: ConfigRule, kind: str, registry: str, fmt: RegistryFormatType, where: str, problems: list[str]
) -> PolicyRule | None:
    try:
        package = check_pattern(entry.package, fmt.normalize_name)
    except (ValueError, BadRequest) as exc:
        problems.append(f"{where}.package: {exc.message if isinstance(exc, BadRequest) else exc}")
        return None
    try:
        versions = check_range(entry.versions, fmt.version_range)
    except ValueError as exc:
        problems.append(f"{where}.versions: {exc}")
        return None
    return PolicyRule(
        id="",
        registry=registry,
        kind=kind,
        package=package,
        versions=versions,
        reason=entry.reason,
        author="config",
        created=0.0,
        expires=entry.expires,
        source="config",
    )
