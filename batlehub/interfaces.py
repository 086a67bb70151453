"""The seams of BatleHub: one `typing.Protocol` per kind of backend, and the descriptors that
plugins return from the `register_*` hooks.

Change an interface by adding to it (a new optional method, a new Protocol), never by silently
changing a signature: third-party plugins implement these.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import BaseModel

from batlehub.configmodel import ConfigModel

if TYPE_CHECKING:
    from aiohttp import web

    from batlehub.config import RegistrySettings, Settings
    from batlehub.registries import RegistryServices


# --- values passed across the seams -------------------------------------------------------------


@dataclass(frozen=True)
class IpBlock:
    """An IP address that is refused until `expires_at` (epoch seconds)."""

    ip: str
    reason: str
    expires_at: float
    created_at: float


@dataclass(frozen=True)
class Banner:
    """The global message shown to every client (npm prints it from the `npm-notice` header)."""

    message: str
    level: str = "info"


@dataclass(frozen=True)
class WindowCount:
    """Result of one atomic increment of a fixed-window counter."""

    count: int
    """The counter's value after this increment."""
    reset_in_secs: float
    """Seconds until the window ends and the counter starts again from zero."""


@dataclass(frozen=True)
class StoredBlob:
    """What a storage backend reports after a successful `put`.

    Digests are computed from the bytes actually written, as lowercase hex.
    """

    key: str
    size: int
    sha512: str
    sha256: str
    sha1: str


@dataclass(frozen=True)
class BlobStat:
    key: str
    size: int
    modified: float
    """Last modification, epoch seconds."""


# --- cache backend ------------------------------------------------------------------------------


@runtime_checkable
class CacheBackend(Protocol):
    """All shared, short-lived state: everything that every replica must see the same way.

    A backend that keeps state per process (`memory`) is only correct for a single process;
    `postgres` and `redis` are shared. Every method is safe to call from many tasks at once.
    Keys are opaque strings chosen by callers (e.g. `npm:packument:npm:lodash`).
    """

    async def open(self) -> None:
        """Connect and create whatever the backend needs. Called once, at app start."""

    async def close(self) -> None:
        """Release connections. Called once, at app shutdown."""

    async def ping(self) -> None:
        """Return if the backend answers; raise any exception if it does not (used by health)."""

    # metadata cache
    async def get(self, key: str) -> bytes | None:
        """The value stored under `key` if it is still fresh (its TTL has not run out), else None."""

    async def get_stale(self, key: str) -> bytes | None:
        """The value stored under `key` even if its TTL ran out, as long as the backend still has it.

        Backends keep expired values for at least `stale_retention_secs` passed to `set`.
        """

    async def set(
        self, key: str, value: bytes, ttl_secs: float | None = None, stale_retention_secs: float = 86400.0
    ) -> None:
        """Store `value`, fresh for `ttl_secs` (None: until invalidated), then stale for a while."""

    async def invalidate(self, key: str) -> None:
        """Forget `key` entirely (neither fresh nor stale reads return it)."""

    # rate-limit counters
    async def incr_window(self, key: str, window_secs: float) -> WindowCount:
        """Atomically add one to the counter of the current fixed window of `window_secs` for `key`.

        One round trip; concurrent callers on any replica never lose an increment.
        """

    # IP violations and blocks
    async def record_violation(self, ip: str, window_secs: float) -> int:
        """Count one violation for `ip`; return the number recorded in the last `window_secs`."""

    async def block_ip(self, block: IpBlock) -> None:
        """Refuse `block.ip` until `block.expires_at`. Replaces an existing block of that IP."""

    async def get_block(self, ip: str) -> IpBlock | None:
        """The block in force for `ip`, or None (expired blocks are never returned)."""

    async def list_blocks(self) -> list[IpBlock]:
        """Every block in force, in no particular order."""

    async def unblock_ip(self, ip: str) -> bool:
        """Lift the block of `ip` and forget its violations; True if there was a block."""

    # global banner
    async def get_banner(self) -> Banner | None:
        """The banner, or None when none is set."""

    async def set_banner(self, banner: Banner | None) -> None:
        """Set the banner, or clear it with None."""

    # leases (short locks with an owner)
    async def acquire_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        """Take the lease `key` for `owner` unless someone else holds it; True if taken.

        The lease lapses by itself after `ttl_secs`, so a crashed holder never blocks others for long.
        """

    async def release_lease(self, key: str, owner: str) -> bool:
        """Release `key` only if `owner` holds it (atomically); True if released."""

    async def extend_lease(self, key: str, owner: str, ttl_secs: float) -> bool:
        """Push the lease's expiry to now + `ttl_secs` only if `owner` holds it; True if extended."""


# --- storage backend ----------------------------------------------------------------------------


@runtime_checkable
class StorageBackend(Protocol):
    """Where artifacts (tarballs, ...) live. Keys are relative, `/`-separated, validated with
    `batlehub.storage.validate_key` (no `..`, no absolute paths, no backslash, no NUL).

    Writes are all-or-nothing: a reader never sees a partial object under its key.
    """

    async def open(self) -> None:
        """Connect / create the root. Called once, at app start."""

    async def close(self) -> None:
        """Release resources. Called once, at app shutdown."""

    async def ping(self) -> None:
        """Return if storage is usable; raise otherwise (used by health)."""

    async def put(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
        expected: Mapping[str, str] | None = None,
    ) -> StoredBlob:
        """Stream `chunks` into `key`, hashing as it goes, and return size and digests.

        `max_size`: raise `PayloadTooLarge` as soon as more bytes arrive, storing nothing.
        `expected`: algorithm (`sha512`, `sha256`, `sha1`) -> lowercase hex digest; any mismatch
        raises `IntegrityError` and stores nothing. An existing object under `key` is replaced.
        """

    def get(self, key: str, start: int | None = None, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream the object's bytes, optionally only `[start, end)`. Raises `NotFound` if missing
        (before yielding anything).

        `start=None` means 0 and `end=None` the size; an `end` past the size is clamped to it. An
        empty range (`start >= end`, or `start >= size`) yields nothing and is not an error, so a
        caller that parsed an HTTP `Range` decides about 416 itself. Negative offsets raise
        `ValueError`. `batlehub.testing.storage_contract` checks all of this."""

    async def stat(self, key: str) -> BlobStat | None:
        """Size and modification time, or None if there is no such object."""

    async def delete(self, key: str) -> bool:
        """Remove the object; True if it existed."""

    def list(self, prefix: str = "") -> AsyncIterator[BlobStat]:
        """Every object whose key starts with `prefix` (a plain string match: `"p1"` also matches
        `p1x/a`), in no particular order."""

    # optional capabilities: return None when not supported

    def local_path(self, key: str) -> Path | None:
        """A file on this machine holding the object (lets the server use sendfile), or None."""

    async def presigned_url(self, key: str, expires_secs: int = 300) -> str | None:
        """A short-lived URL that serves the object without the hub, or None."""


# --- registry formats ---------------------------------------------------------------------------


@runtime_checkable
class Registry(Protocol):
    """One configured registry (`[[registries]]` entry) of some format."""

    name: str

    def make_app(self) -> web.Application:
        """An aiohttp application with this registry's routes; mounted at `/registries/{name}/`."""

    async def startup(self) -> None:
        """Called once the app's services are open (e.g. to warm packages). May return at once
        and run work in the background; must not raise for upstream trouble."""

    async def shutdown(self) -> None:
        """Stop background work. Core closes the registry's services afterwards."""


# --- policies -----------------------------------------------------------------------------------
#
# A policy decides, per registry, package and version, whether clients may see a version. Core
# asks every policy of a registry about a whole package at once (one call per package and
# document, not per version), combines the answers, caches the outcome per document and policy
# revision, and applies it to metadata and artifact downloads alike (`batlehub.policies`).


VISIBLE = "visible"
HIDDEN = "hidden"
BLOCKED = "blocked"

HIDE = "hide"
BLOCK = "block"
ALLOW = "allow"
EXEMPT = "exempt"
VERDICT_ACTIONS = (EXEMPT, BLOCK, ALLOW, HIDE)
"""What a policy may say of a version, strongest first: when policies disagree about a version,
the first action of this list that any of them said wins (an exemption lifts a block, a block
beats an allow, an allow lifts a hide)."""


@dataclass(frozen=True)
class PolicySubject:
    """One package as policies see it: its versions and their publish times."""

    registry: str
    format: str
    package: str
    scope: str | None
    """The package's scope (npm `@scope`), None outside any scope or for formats without scopes."""
    local: bool
    """True for a package published here, False for one from an upstream registry."""
    versions: Mapping[str, float | None]
    """Version -> publish time (epoch seconds): the upstream registry's own time for upstream
    packages (npm `time`, PyPI `upload-time`), the time of the publish here for local ones; None
    when the document gives no usable time."""
    now: float
    """The time to decide at (epoch seconds); never read the clock yourself."""


@dataclass(frozen=True)
class Verdict:
    """A policy's opinion of one version."""

    action: str
    """One of `VERDICT_ACTIONS`: "hide" (withhold: not in metadata, downloads refused), "block"
    (refused as known bad), "allow" (lift hides of other policies), "exempt" (lift everything)."""
    rule: str
    """Which rule said so, stable and short (`release-age`, `block/3f9a0c1d2e4b`): shown to clients
    and in the audit log."""
    reason: str
    """Why, in a sentence a user reads in their client's error output."""
    until: float | None = None
    """The opinion holds until this time (epoch seconds), e.g. when a version becomes old enough or
    an exemption expires; None: until the policy changes. Core re-asks after it."""


@runtime_checkable
class Policy(Protocol):
    """One policy, as built for one registry by its `PolicyType.factory`."""

    name: str
    needs_times: bool
    """True when `decide` reads publish times: core then fetches the documents that carry them
    (npm's full packument rather than the abbreviated one)."""

    def concerns(self, package: str, local: bool) -> bool:
        """Whether this policy may have an opinion on any version of `package`. Called on every
        request that reads the package: no I/O, no work proportional to its versions. False lets
        core skip reading the package's versions altogether."""

    def decide(self, subject: PolicySubject) -> Mapping[str, Verdict] | Awaitable[Mapping[str, Verdict]]:
        """Opinions on the subject's versions, by version; versions without one are left out.
        May be async. Called once per document, policy revision and `Verdict.until`, not per
        request; still, keep it proportional to the number of versions."""


# --- descriptors returned by the register_* hooks -----------------------------------------------
#
# The config contract, the same for the three kinds of descriptor:
#
# * `config_model` is a pydantic model of the keys the descriptor owns: a `[cache]` or `[storage]`
#   table minus `type`; for a registry format, the keys of a `[[registries]]` entry other than the
#   core's (type, name, rbac, rate_limit, quota). Derive it from `batlehub.configmodel.ConfigModel`
#   (re-exported by `batlehub.api`): it refuses unknown keys, which core requires of every model.
# * Core validates with it in one place, `batlehub.app.validate_config`, for `create_app` and
#   `batlehub check-config` alike, and reports each error by its key path
#   (`storage.bucket: required`). A validator that needs the core settings reads them with
#   `batlehub.configmodel.core_settings(info)`.
# * The factory then receives the validated model instance, never the raw table: it only
#   constructs (no I/O) and does not validate again.


class NoConfig(ConfigModel):
    """The model of a descriptor that owns no keys: any key in its table is reported as unknown."""


@dataclass(frozen=True)
class DefaultRegistry:
    """The registry a format offers when the config has no `[[registries]]` (the embedded
    default): a name and the format's own options for it."""

    name: str
    options: Mapping[str, Any]
    note: str = ""
    """One line for the start-up log: where the upstream came from, or the setting to add."""


@dataclass(frozen=True)
class CacheBackendType:
    """A kind of cache backend that `[cache] type = name` selects."""

    name: str
    description: str
    factory: Callable[[Any, Settings], CacheBackend]
    """Called with the validated `config_model` instance and the whole settings."""
    shared: bool = True
    """False when state is per process, so several replicas would not see each other's state."""
    config_model: type[BaseModel] = NoConfig
    """The keys the `[cache]` table may hold besides `type` (see the config contract above)."""


@dataclass(frozen=True)
class StorageBackendType:
    """A kind of storage backend that `[storage] type = name` selects."""

    name: str
    description: str
    factory: Callable[[Any, Settings], StorageBackend]
    """Called with the validated `config_model` instance and the whole settings."""
    shared: bool = True
    """False when objects live on this machine only (e.g. `filesystem` on a local disk)."""
    capabilities: frozenset[str] = field(default_factory=frozenset)
    """Any of "local_path", "presigned_url"."""
    config_model: type[BaseModel] = NoConfig
    """The keys the `[storage]` table may hold besides `type` (see the config contract above)."""


@dataclass(frozen=True)
class RegistryFormatType:
    """A kind of registry that `[[registries]] type = name` selects."""

    name: str
    description: str
    config_model: type[BaseModel]
    """The format's own keys of a `[[registries]]` entry (see the config contract above)."""
    factory: Callable[[RegistrySettings, RegistryServices], Registry]
    """Build the registry. Core hands it the entry with `options` replaced (`dataclasses.replace`)
    by the validated `config_model` instance; `RegistrySettings.validated_options(Model)` returns
    it typed. The same entry is in the app's settings and in `RegistryServices.registry`."""
    scope_of: Callable[[str], str | None] | None = None
    """The scope of a package name (npm: `@scope` of `@scope/name`), or None for a name outside
    any scope. Scopes have owners too (DESIGN §6); None here: the format has no scopes."""
    default_registry: Callable[[Settings], DefaultRegistry | None] | None = None
    """The registry this format adds to a config without `[[registries]]`, or None for none. Called
    once at start (it may look at the user's client configuration, e.g. npm's registry)."""
    usage: Callable[[str], list[str]] | None = None
    """Given a registry's URL, the lines a user pastes to point the format's clients at it (for
    the start-up log and the front page), e.g. npm's two `.npmrc` lines."""
    redact_path: Callable[[str], str] | None = None
    """The raw path below the registry's mount point as logs may show it, with secrets that the
    format's clients put in paths replaced (npm logout sends the token in the URL). None: paths
    hold no secrets."""
    normalize_name: Callable[[str], str] | None = None
    """A package or scope name as the format stores it (e.g. lowercased), raising `BadRequest`
    for one the format would refuse. Used where names arrive outside the format's own routes (the
    admin API). None: names are used as given."""
    version_range: Callable[[str], Callable[[str], bool]] | None = None
    """Parse a version range in the format's own syntax (npm: `>=1.2.0 <1.3.0 || 2.x`, see
    `batlehub.api.semver_range`; PyPI would take PEP 440 specifiers) into a test of a version;
    raise `ValueError` for a bad range. Block, allow and exemption rules name versions with it.
    None: rules take `*`, or exact versions separated by `||`."""


@dataclass(frozen=True)
class PolicySetup:
    """What a policy's factory gets: one registry, and the rules kept by core for it."""

    registry: RegistrySettings
    format: RegistryFormatType
    rules: Any
    """The registry's block, allow and exemption rules (`batlehub.policy_rules.RegistryRules`):
    `matching(package)` lists the rules in force that name the package, read from memory."""


@dataclass(frozen=True)
class PolicyType:
    """A kind of policy (`register_policies`). Every registry gets one of each, from `factory`."""

    name: str
    description: str
    factory: Callable[[PolicySetup], Policy | None]
    """Build the policy for one registry, or None when it has nothing to do there (e.g. no
    `min_release_age` configured). Constructs only: no I/O."""
