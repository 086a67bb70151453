"""The plugin surface: everything a registry format may use from core, in one place.

A format imports from `batlehub.api` and nothing else in `batlehub` (backends also use
`batlehub.interfaces` and `batlehub.storage`, see their guides). What is here is documented in
docs/plugins/registry-formats.md; what is not here may change without notice.

- Registering: `hookimpl`, `RegistryFormatType`, the `Registry` protocol, `ClientConfig` (the
  embedded default's upstream, read from the user's own client), and for the format's
  `config_model`: `ConfigModel` (its base), `ConfigList` (a TOML array), `core_settings`;
  `ProxyOptions` and `ProxyCacheOptions` (mode, upstreams, cache: what a proxying format's entry
  shares), `HttpUrl`.
- Per registry (`RegistryServices`, handed to the format's factory): the package store, the
  artifact store, upstream documents, where downloads may come from (`UpstreamOrigins`), the
  fail-open cache, tokens.
- Per request: `identity`, `client_ip`, `actor`, `require` (RBAC), `registry_of`, `base_url`,
  `registry_url`, bounded body readers (and `gunzip`, bounded too), `label_route` (the route's
  name in metrics and traces); for formats that parse their raw paths, `decode_path_segment`,
  `refuse_path_escape` and `route_handler` (their own route table); `banner_header`, a
  middleware that puts the banner on responses.
- `JsonStream`: reads a JSON request body incrementally, streaming one big base64 member out.
- Policies: `RegistryServices.policy` (upstream documents come filtered; call
  `require_visible` before serving a version), and for policy plugins `PolicyType`, `Policy`,
  `PolicySetup`, `PolicySubject`, `Verdict` and its actions; `semver_range` for formats whose
  versions are semver.
- Digests: `sri_to_hex` and `hex_to_sri` (Subresource Integrity strings, `sha512-<base64>`).
- `warm_up`: fetch configured entries at start, once across all replicas.
- Domain errors: raise them; core turns them into JSON errors with the right status.
- The web UI: `PackagePage` (with `VersionInfo`, `FileInfo`, `Dependency`), what a format's
  `package_page` hook returns; `DocumentSummary`, what its `DocumentFormat.summarize` returns.
"""

from __future__ import annotations

from batlehub.artifacts import VERIFIABLE, ArtifactStore, BlobMissing, IncomingBlob, SpooledBlob, blob_key
from batlehub.auth import ANONYMOUS, Identity
from batlehub.cli_login import CliLogins
from batlehub.client_config import ClientConfig
from batlehub.config import RegistrySettings, Settings
from batlehub.configmodel import ConfigList, ConfigModel, core_settings
from batlehub.coordination import BackgroundWrites, FailOpenCache, LogThrottle, SingleFlight, warm_up
from batlehub.errors import (
    AlreadyExists,
    BadRequest,
    BatleHubError,
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidKey,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UnprocessableEntity,
    UpstreamError,
)
from batlehub.guide import points_at_this_hub
from batlehub.interfaces import (
    ALLOW,
    BLOCK,
    EXEMPT,
    HIDE,
    DefaultRegistry,
    Policy,
    PolicySetup,
    PolicySubject,
    PolicyType,
    Registry,
    RegistryFormatType,
    StoredBlob,
    Verdict,
)
from batlehub.jsondoc import MAX_DEPTH as MAX_JSON_DEPTH
from batlehub.jsondoc import check as check_json
from batlehub.jsondoc import may_need_repair as json_may_need_repair
from batlehub.jsondoc import repair as repair_json
from batlehub.jsonstream import JsonStream, ReadChunk
from batlehub.outbound import UpstreamOrigins
from batlehub.package_page import Dependency, FileInfo, PackagePage, VersionInfo
from batlehub.packages import (
    FileRecord,
    NewFile,
    Package,
    PackageRows,
    PackageStore,
    PackageSummary,
    PackageWrite,
    VersionRecord,
    package_of,
)
from batlehub.plugins import hookimpl
from batlehub.policies import PolicyRefused, RegistryPolicy
from batlehub.policy_config import semver_range
from batlehub.proxy_options import HttpUrl, Mode, ProxyCacheOptions, ProxyOptions
from batlehub.registries import RegistryServices
from batlehub.rendering import (
    Rendered,
    RenderedCache,
    accepts,
    content_etag,
    etag_matches,
    gzipped,
    respond,
    revision_etag,
)
from batlehub.requests import (
    Actor,
    actor,
    banner_header,
    base_url,
    body_reader,
    client_ip,
    decode_path_segment,
    epoch_of,
    gunzip,
    identity,
    label_route,
    parse_json,
    read_body,
    read_json,
    refuse_path_escape,
    registry_of,
    registry_path,
    registry_subpath,
    registry_url,
    require,
    route_handler,
)
from batlehub.sri import hex_to_sri, sri_to_hex
from batlehub.upstream import DocumentFormat, DocumentSummary, UpstreamDocument, UpstreamDocuments, UpstreamStats

__all__ = [
    "ALLOW",
    "ANONYMOUS",
    "BLOCK",
    "EXEMPT",
    "HIDE",
    "MAX_JSON_DEPTH",
    "VERIFIABLE",
    "Actor",
    "AlreadyExists",
    "ArtifactStore",
    "BackgroundWrites",
    "BadRequest",
    "BatleHubError",
    "BlobMissing",
    "CliLogins",
    "ClientConfig",
    "ConfigList",
    "ConfigModel",
    "Conflict",
    "DefaultRegistry",
    "Dependency",
    "DocumentFormat",
    "DocumentSummary",
    "FailOpenCache",
    "FileInfo",
    "FileRecord",
    "Forbidden",
    "HttpUrl",
    "Identity",
    "IncomingBlob",
    "IntegrityError",
    "InvalidKey",
    "JsonStream",
    "LogThrottle",
    "MethodNotAllowed",
    "Mode",
    "NewFile",
    "NotFound",
    "Package",
    "PackagePage",
    "PackageRows",
    "PackageStore",
    "PackageSummary",
    "PackageWrite",
    "PayloadTooLarge",
    "Policy",
    "PolicyRefused",
    "PolicySetup",
    "PolicySubject",
    "PolicyType",
    "ProxyCacheOptions",
    "ProxyOptions",
    "RateLimited",
    "ReadChunk",
    "Registry",
    "RegistryFormatType",
    "RegistryPolicy",
    "RegistryServices",
    "RegistrySettings",
    "Rendered",
    "RenderedCache",
    "RequestTimeout",
    "ServiceUnavailable",
    "Settings",
    "SingleFlight",
    "SpooledBlob",
    "StoredBlob",
    "Unauthorized",
    "UnprocessableEntity",
    "UpstreamDocument",
    "UpstreamDocuments",
    "UpstreamError",
    "UpstreamOrigins",
    "UpstreamStats",
    "Verdict",
    "VersionInfo",
    "VersionRecord",
    "accepts",
    "actor",
    "banner_header",
    "base_url",
    "blob_key",
    "body_reader",
    "check_json",
    "client_ip",
    "content_etag",
    "core_settings",
    "decode_path_segment",
    "epoch_of",
    "etag_matches",
    "gunzip",
    "gzipped",
    "hex_to_sri",
    "hookimpl",
    "identity",
    "json_may_need_repair",
    "label_route",
    "package_of",
    "parse_json",
    "points_at_this_hub",
    "read_body",
    "read_json",
    "refuse_path_escape",
    "registry_of",
    "registry_path",
    "registry_subpath",
    "registry_url",
    "repair_json",
    "require",
    "respond",
    "revision_etag",
    "route_handler",
    "semver_range",
    "sri_to_hex",
    "warm_up",
]
