"""What core hands each configured registry: `RegistryServices`.

A format's factory gets its registry's settings and these services, and builds its protocol on
them; it never sees the database, the plugin manager or the raw backends. Everything it may import
from core is re-exported by `batlehub.api`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import aiohttp

from batlehub.artifacts import ArtifactStore
from batlehub.cli_login import CliLogins
from batlehub.config import RetentionSettings
from batlehub.coordination import FailOpenCache
from batlehub.interfaces import PolicySetup, PolicyType
from batlehub.offload import Offloader
from batlehub.outbound import UpstreamOrigins
from batlehub.packages import PackageStore
from batlehub.plugins import fire_event, flatten
from batlehub.policies import PolicyStats, RegistryPolicy
from batlehub.policy_documents import PolicedDocuments
from batlehub.policy_rules import LiveRules, RuleBook, config_rules
from batlehub.rendering import RenderedCache
from batlehub.retention import Retention, UseLog
from batlehub.upstream import DocumentFormat, KnownPackage, UpstreamDocuments, UpstreamStats, known_packages

if TYPE_CHECKING:
    import pluggy

    from batlehub.auth import Authenticator
    from batlehub.config import RegistrySettings, Settings
    from batlehub.db import Database
    from batlehub.interfaces import (
        CacheBackend,
        CacheBackendType,
        RegistryFormatType,
        StorageBackend,
        StorageBackendType,
    )


class RegistryServices:
    """The services of one registry (all shared, long-lived objects):

    - `packages`: its `PackageStore` (packages, versions, files, tags, owners; every write one
      unit of work with permission, ownership, quota, audit and invalidation);
    - `artifacts`: its `ArtifactStore` (content-addressed blobs: keep, fetch, serve);
    - `upstream_documents(...)`: builds the coordinated, cached view of its upstreams' documents;
    - `rendered_cache()`: pre-rendered documents within the registry's memory share, spilling to disk;
    - `offload`: runs CPU-heavy work on big documents in a worker process;
    - `cache`: the cache backend, failing open (`FailOpenCache`), for what the format keeps itself;
    - `tokens`: identify a token (`npm login`) or revoke it (`npm logout`);
    - `cli_logins`: sign a command-line client in through the browser (`npm login --auth-type=web`);
    - `settings` (the whole configuration, read-only) and `registry` (this registry's entry);
    - `cache_type`, `storage_type`: the descriptors of the configured backends (e.g. whether the
      cache is shared by replicas);
    - `policy`: the registry's policies (`batlehub.policies.RegistryPolicy`). Upstream documents
      come filtered by them already; a format calls `policy.require_visible(name, version)`
      before serving a version's artifact or document, and reads local packages through
      `policy.visible_package` / `policy.local_stamp`.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        registry: RegistrySettings,
        format_type: RegistryFormatType,
        db: Database,
        cache: CacheBackend,
        cache_type: CacheBackendType,
        storage: StorageBackend,
        storage_type: StorageBackendType,
        tokens: Authenticator,
        http: Callable[[], aiohttp.ClientSession],
        pm: pluggy.PluginManager,
        offload: Offloader | None = None,
        share: float = 1.0,
        rules: RuleBook | None = None,
        policy_types: list[PolicyType] | None = None,
        policy_stats: PolicyStats | None = None,
        fail_open: FailOpenCache | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.format_type = format_type
        self.cache = fail_open or FailOpenCache(cache)
        """Shared by the app's registries (`appkeys.FAIL_OPEN_CACHE`): one banner memory, one throttle."""
        self.cache_type = cache_type
        self.storage_type = storage_type
        self.tokens = tokens
        self.cli_logins = CliLogins(self.cache)
        self.http = http
        self.offload = offload or Offloader()
        """Runs CPU-heavy work on big documents in a worker process (`batlehub.offload`)."""
        self._share = share
        self.stats = UpstreamStats()
        """What this process asked the upstreams on this registry's behalf."""
        self.origins = UpstreamOrigins(registry=registry.name)
        """Where this registry may send requests: its upstreams (added by `upstream_documents`)."""
        self._db = db
        self.packages = PackageStore(
            registry=registry,
            format_name=format_type.name,
            db=db,
            cache=self.cache,
            fire=partial(fire_event, pm),
            scope_of=format_type.scope_of,
        )
        self.uses = UseLog(db, registry.name)
        """What was served from proxied content, for retention's least-recently-used order."""
        self.artifacts = ArtifactStore(
            format_name=format_type.name,
            registry=registry.name,
            storage=storage,
            storage_type=storage_type,
            db=db,
            cache=self.cache,
            http=http,
            spool_dir=settings.data_dir / "tmp",
            max_size=settings.limits.max_artifact_size_bytes,
            stats=self.stats,
            origins=self.origins,
            uses=self.uses,
            shared_cache=cache_type.shared,
        )
        self._documents: list[UpstreamDocuments] = []
        self.retention = Retention(
            registry=registry.name,
            settings=registry.retention or RetentionSettings(),
            db=db,
            storage=storage,
            cache=cache,
            documents=lambda: self._documents,
            origins=self.origins,
            http=http,
            forget_artifact=self.artifacts.forget,
            uses=self.uses,
        )
        """Evicts proxied content per `[registries.retention]` (run on a schedule only when set)."""
        if rules is None:  # a registry built alone (tests): its own book, its configured rules only
            rules = RuleBook(
                db=db,
                cache=self.cache,
                formats={registry.name: format_type},
                config_rules={registry.name: config_rules(registry, format_type, registry.name)[0]},
            )
        types = policy_types if policy_types is not None else flatten(pm.hook.register_policies())
        setup = PolicySetup(registry=registry, format=format_type, rules=LiveRules(rules, registry.name))
        self.policy = RegistryPolicy(
            registry=registry.name,
            format_name=format_type.name,
            scope_of=format_type.scope_of,
            policies=[p for p in (t.factory(setup) for t in types) if p is not None],
            rules=rules,
            packages=self.packages,
            db=db,
            stats=policy_stats,
        )

    def upstream_documents(
        self,
        document_format: DocumentFormat,
        *,
        upstreams: list[str],
        metadata_ttl_secs: float,
        serve_stale: bool,
        guard_publishes: bool = True,
    ) -> UpstreamDocuments:
        """The registry's documents from `upstreams`, fetched, cached and revalidated once for all
        replicas (see `batlehub.upstream`). Names reserved for local use are never asked for.

        With `guard_publishes` (a registry that both proxies and hosts), a name an upstream has
        cannot be published here unless an admin reserved it."""
        self.origins.add(upstreams)
        documents = PolicedDocuments(
            policy=self.policy,
            registry=self.registry.name,
            format_name=self.format_type.name,
            upstreams=upstreams,
            document_format=document_format,
            metadata_ttl_secs=metadata_ttl_secs,
            serve_stale=serve_stale,
            db=self._db,
            cache=self.cache,
            shared_cache=self.cache_type.shared,
            http=self.http,
            max_document_bytes=self.settings.limits.max_artifact_size_bytes,
            reserved=self.packages.is_reserved,
            stats=self.stats,
            origins=self.origins,
            offload=self.offload,
            memo_max_bytes=self._memory_bytes() // 3,
            storage=self.artifacts.storage,
            uses=self.uses,
        )
        if guard_publishes and upstreams:
            self.packages.upstream_has = documents.exists
        self.policy.documents = documents
        self._documents.append(documents)
        return documents

    def rendered_cache(self) -> RenderedCache:
        """A cache for the registry's rendered documents within its share of
        `limits.cache_memory_bytes`, spilling to `<data dir>/rendered/<registry>/`."""
        return RenderedCache(
            max_bytes=self._memory_bytes() * 2 // 3,
            spill_dir=self.settings.data_dir / "rendered" / self.registry.name,
            max_spill_bytes=int(self.settings.limits.cache_disk_bytes * self._share),
        )

    def _memory_bytes(self) -> int:
        return int(self.settings.limits.cache_memory_bytes * self._share)

    async def proxied_packages(self, text: str = "") -> list[KnownPackage]:
        """The names this registry holds upstream documents of (by name), for listings; `text`
        filters on the name and the summary's description."""
        if not self._documents:
            return []
        return await known_packages(self._db, self.registry.name, text)

    async def settle(self) -> None:
        """Wait for the writes made after answering (tests call this before looking)."""
        for documents in self._documents:
            await documents.settle()
        await self.artifacts.settle()
        await self.policy.settle()

    async def close(self) -> None:
        await self.retention.close()
        for documents in self._documents:
            await documents.close()
        await self.artifacts.close()
        await self.policy.settle()
