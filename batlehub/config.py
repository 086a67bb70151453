"""Configuration: TOML through dynaconf, overridden by `BATLEHUB_<SECTION>__<KEY>` environment
variables, validated into frozen, typed settings.

Validation collects every problem (each naming its key path) before failing, so an operator can fix
a config in one go: `server.port: expected an integer, got "abc"`.
"""

from __future__ import annotations

import builtins
import ipaddress
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from batlehub.errors import ConfigError
from batlehub.policy_config import PolicyConfig

ROLES = ("anonymous", "user", "admin")
TOKEN_ROLES = ("user", "admin", "metrics")
"""Roles a token may have. "metrics" may read `GET /metrics` and nothing more than anonymous."""
PERMISSIONS = ("releases:read", "source:read", "releases:publish", "releases:delete", "*")
DEFAULT_RBAC: dict[str, tuple[str, ...]] = {
    "anonymous": ("releases:read", "source:read"),
    "user": ("releases:read", "source:read", "releases:publish"),
    "admin": ("*",),
}
# Environment variables under our prefix that are not settings (BATLEHUB_TEST_* belong to the test
# harness, which a `batlehub serve` started by a test inherits).
_NOT_SETTINGS = {
    "CONFIG",
    "DISABLE_PLUGIN_AUTOLOAD",
    "DATA_DIR",
    "LOAD_DOTENV",
    "TEST_SERVICES",
    "LOG_LEVEL",
    "LOG_FORMAT",
}
_NOT_SETTINGS_PREFIX = "TEST_"
# Keys of a `[[registries]]` entry that core owns; the rest belong to the registry format.
REGISTRY_CORE_KEYS = frozenset({"type", "name", "rbac", "rate_limit", "quota", "retention", "policy"})

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "0.0.0.0"
    port: int = 8080
    static_dir: Path | None = None
    cors_allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    public_url: str = ""
    shutdown_timeout_secs: float = 30.0
    workers: int = 1


@dataclass(frozen=True)
class DatabaseSettings:
    type: str = "sqlite"
    path: Path | None = None
    url: str = ""
    max_connections: int = 10


@dataclass(frozen=True)
class TokenEntry:
    value: str
    """Plaintext token, or `sha256:<hex>` of it."""
    role: str
    user_id: str


@dataclass(frozen=True)
class AuthSettings:
    type: str
    tokens: tuple[TokenEntry, ...] = ()


@dataclass(frozen=True)
class RateLimitSettings:
    requests_per_window: int
    window_secs: float


@dataclass(frozen=True)
class QuotaSettings:
    max_bytes_per_user: int = 0
    """0 = unlimited."""
    max_versions_per_user: int = 0
    """0 = unlimited."""
    enforcement: str = "block"


@dataclass(frozen=True)
class RetentionSettings:
    """`[registries.retention]`: how much proxied content a registry keeps (see `batlehub.retention`)."""

    max_bytes: int = 0
    """Evict the least recently used cached upstream content above this many bytes; 0 = no cap."""
    max_idle_days: float = 0.0
    """Evict cached upstream content unused for this long; 0 = no idle limit."""
    dry_run: bool = False
    """Only report (log and admin API) what would be evicted."""


@dataclass(frozen=True)
class RegistrySettings:
    type: str
    name: str
    rbac: Mapping[str, tuple[str, ...]]
    rate_limit: RateLimitSettings | None
    quota: QuotaSettings | None
    options: Mapping[str, Any] | BaseModel
    """Every other key of the entry: as read until the format's `config_model` validated them
    (`batlehub.app.validate_config`), then that model's instance. `create_app` puts the validated
    entry in the app's settings, so a running registry only ever sees the model."""
    retention: RetentionSettings | None = None
    """None: proxied content is kept for ever."""
    policy: PolicyConfig | None = None
    """`[registries.policy]`: the release-age gate and configured block/allow rules (None: none)."""

    def validated_options(self, model: builtins.type[_M]) -> _M:  # `type` is a field here
        """`options` as the format's validated `config_model`, typed for the format's code."""
        if not isinstance(self.options, model):
            raise TypeError(
                f"registry {self.name!r}: options are not a validated {model.__name__}"
                " (batlehub.app.validate_config makes them one)"
            )
        return self.options


@dataclass(frozen=True)
class LimitsSettings:
    max_artifact_size_bytes: int = 524_288_000
    max_document_bytes: int = 8 * 1024 * 1024
    """JSON documents other than artifacts: publish manifests, logins, upstream metadata."""
    header_timeout_secs: float = 10.0
    """A connection's request line and headers must arrive within this (and an idle keep-alive
    connection is closed after it)."""
    body_idle_timeout_secs: float = 30.0
    """A request body that sends no bytes for this long is answered 408 and closed."""
    cache_memory_bytes: int = 96 * 1024 * 1024
    """Memory each process may give its document caches (rendered responses, upstream bodies),
    shared among the registries; what does not fit spills to disk."""
    cache_disk_bytes: int = 1024 * 1024 * 1024
    """Disk each process may give rendered responses spilled from memory, under the data dir."""


@dataclass(frozen=True)
class IpBlockingSettings:
    enabled: bool = False
    violation_threshold: int = 10
    violation_window_secs: float = 300.0
    ban_duration_secs: float = 3600.0
    trigger_on_status: tuple[int, ...] = (401, 403, 429)


@dataclass(frozen=True)
class SweepSettings:
    """The storage sweep that deletes blobs no database row references (e.g. left by a replica
    that crashed between writing a tarball and committing its version)."""

    enabled: bool = True
    interval_secs: float = 3600.0
    grace_secs: float = 3600.0
    """Blobs younger than this are never deleted, so a publish still in flight keeps its blob."""


@dataclass(frozen=True)
class MetricsSettings:
    """`GET /metrics` in the Prometheus text format (see docs/observability.md)."""

    enabled: bool = True
    """False: nothing is counted and there is no /metrics (no cost on any request)."""
    require_token: bool = True
    """An admin token or a token with role "metrics" must be sent; false = open to anyone."""
    port: int = 0
    """> 0: serve /metrics on this port instead (on `server.host`), without auth: for a port that
    only the scraper can reach."""


@dataclass(frozen=True)
class OtelSettings:
    endpoint: str = ""
    service_name: str = "batlehub"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    cache: Mapping[str, Any] = field(default_factory=lambda: {"type": "memory"})
    storage: Mapping[str, Any] = field(default_factory=lambda: {"type": "filesystem"})
    auth: tuple[AuthSettings, ...] = ()
    registries: tuple[RegistrySettings, ...] = ()
    default_registries: bool = False
    """True when the config has no [[registries]]: every installed format then adds the registry
    it offers by default (`batlehub.app.with_default_registries`), e.g. npm's, proxying the
    registry the local npm client uses."""
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    ip_blocking: IpBlockingSettings = field(default_factory=IpBlockingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    otel: OtelSettings = field(default_factory=OtelSettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    source: str = "embedded default"
    """Where the settings came from (a file path, or "embedded default"), for logs."""

    @property
    def sqlite_path(self) -> Path:
        return self.database.path or self.data_dir / "batlehub.db"

    def registry(self, name: str) -> RegistrySettings | None:
        return next((r for r in self.registries if r.name == name), None)


MAX_USER_ID = 200


def valid_user_id(user_id: object) -> bool:
    """1 to 200 printable characters and no whitespace: a user id appears in log lines, and a
    newline in one would forge log lines."""
    return (
        isinstance(user_id, str)
        and 0 < len(user_id) <= MAX_USER_ID
        and user_id.isprintable()
        and not any(c.isspace() for c in user_id)
    )


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "batlehub"


def read_raw(config_file: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    """Merge the TOML file (if any) with `BATLEHUB_*` environment overrides into plain dicts.

    Section and key names are lower-cased so that `BATLEHUB_SERVER__PORT` and `[server] port` meet.
    """
    from dynaconf import Dynaconf

    config_file = config_file or os.environ.get("BATLEHUB_CONFIG") or None
    files: list[str] = []
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"])
        files.append(str(path.resolve()))
    try:
        dyn = Dynaconf(
            settings_files=files,
            envvar_prefix="BATLEHUB",
            environments=False,
            merge_enabled=True,
            load_dotenv=False,
            core_loaders=["TOML"],
        )
        raw = dyn.as_dict()
    except Exception as exc:  # dynaconf surfaces TOML syntax errors as assorted exception types
        raise ConfigError([f"{config_file}: cannot be read: {exc}"]) from exc
    merged = {k.lower(): _lower_keys(v) for k, v in raw.items() if not _is_cli_variable(k)}
    return merged, (str(config_file) if config_file else "embedded default")


def _is_cli_variable(key: str) -> bool:
    return key.upper() in _NOT_SETTINGS or key.upper().startswith(_NOT_SETTINGS_PREFIX)


def _lower_keys(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): _lower_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read, merge and validate. Raises `ConfigError` with every problem found."""
    raw, source = read_raw(config_file)
    if overrides:
        for section, values in overrides.items():
            if isinstance(values, Mapping) and isinstance(raw.get(section), Mapping):
                raw[section] = {**raw[section], **values}
            else:
                raw[section] = values
    return parse_settings(raw, data_dir=data_dir, source=source)


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.items.append(f"{key}: {message}")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _section(
    raw: Mapping[str, Any],
    name: str,
    spec: Mapping[str, Callable[[str, Any, _Problems], Any]],
    problems: _Problems,
    prefix: str = "",
) -> dict[str, Any]:
    """Validate one table: each known key through its converter, unknown keys reported."""
    path = f"{prefix}{name}"
    section = raw.get(name, {})
    if not isinstance(section, Mapping):
        problems.add(path, f"expected a table, got {_describe(section)}")
        return {}
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in spec:
            problems.add(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(spec))})")
            continue
        converted = spec[key](f"{path}.{key}", value, problems)
        if converted is not _INVALID:
            out[key] = converted
    return out


_INVALID = object()


def _int(minimum: int | None = None, maximum: int | None = None) -> Callable[[str, Any, _Problems], Any]:
    def convert(key: str, value: Any, problems: _Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.add(key, f"expected an integer, got {_describe(value)}")
            return _INVALID
        if minimum is not None and value < minimum:
            problems.add(key, f"must be at least {minimum}, got {value}")
            return _INVALID
        if maximum is not None and value > maximum:
            problems.add(key, f"must be at most {maximum}, got {value}")
            return _INVALID
        return value

    return convert


def _number(minimum: float = 0.0) -> Callable[[str, Any, _Problems], Any]:
    def convert(key: str, value: Any, problems: _Problems) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.add(key, f"expected a number, got {_describe(value)}")  # TOML has nan and inf
            return _INVALID
        if value < minimum:
            problems.add(key, f"must be at least {minimum:g}, got {value}")
            return _INVALID
        return float(value)

    return convert


def _str(choices: tuple[str, ...] | None = None) -> Callable[[str, Any, _Problems], Any]:
    def convert(key: str, value: Any, problems: _Problems) -> Any:
        if not isinstance(value, str):
            problems.add(key, f"expected a string, got {_describe(value)}")
            return _INVALID
        if choices is not None and value not in choices:
            problems.add(key, f"expected one of {', '.join(choices)}, got {_describe(value)}")
            return _INVALID
        return value

    return convert


def _bool(key: str, value: Any, problems: _Problems) -> Any:
    if not isinstance(value, bool):
        problems.add(key, f"expected true or false, got {_describe(value)}")
        return _INVALID
    return value


def _str_list(key: str, value: Any, problems: _Problems) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(key, f"expected a list of strings, got {_describe(value)}")
        return _INVALID
    return tuple(value)


def _int_list(key: str, value: Any, problems: _Problems) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        problems.add(key, f"expected a list of integers, got {_describe(value)}")
        return _INVALID
    return tuple(value)


def _networks(key: str, value: Any, problems: _Problems) -> Any:
    items = _str_list(key, value, problems)
    if items is _INVALID:
        return _INVALID
    networks = []
    for i, item in enumerate(items):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            problems.add(f"{key}[{i}]", f"expected an IP address or CIDR, got {_describe(item)}")
    return tuple(networks)


def _path(key: str, value: Any, problems: _Problems) -> Any:
    if not isinstance(value, str) or not value:
        problems.add(key, f"expected a path, got {_describe(value)}")
        return _INVALID
    return Path(value).expanduser()


def _url(key: str, value: Any, problems: _Problems) -> Any:
    if not isinstance(value, str):
        problems.add(key, f"expected a URL, got {_describe(value)}")
        return _INVALID
    if value and not value.startswith(("http://", "https://")):
        problems.add(key, f"expected an http:// or https:// URL, got {_describe(value)}")
        return _INVALID
    return value.rstrip("/")


_SERVER = {
    "host": _str(),
    "port": _int(0, 65535),
    "static_dir": _path,
    "cors_allowed_origins": _str_list,
    "trusted_proxies": _networks,
    "public_url": _url,
    "shutdown_timeout_secs": _number(),
    "workers": _int(1, 64),
}
_DATABASE = {
    "type": _str(("sqlite", "postgresql")),
    "path": _path,
    "url": _str(),
    "max_connections": _int(1, 1000),
}
_LIMITS = {
    "max_artifact_size_bytes": _int(1),
    "max_document_bytes": _int(1024),
    "header_timeout_secs": _number(0.1),
    "body_idle_timeout_secs": _number(0.1),
    "cache_memory_bytes": _int(1024 * 1024),
    "cache_disk_bytes": _int(0),
}
_IP_BLOCKING = {
    "enabled": _bool,
    "violation_threshold": _int(1),
    "violation_window_secs": _number(1),
    "ban_duration_secs": _number(1),
    "trigger_on_status": _int_list,
}
_METRICS = {"enabled": _bool, "require_token": _bool, "port": _int(0, 65535)}
_OTEL = {"endpoint": _str(), "service_name": _str()}
_SWEEP = {"enabled": _bool, "interval_secs": _number(1), "grace_secs": _number(0)}
_RATE_LIMIT = {"requests_per_window": _int(1), "window_secs": _number(1)}
_QUOTA = {
    "max_bytes_per_user": _int(0),
    "max_versions_per_user": _int(0),
    "enforcement": _str(("block", "warn")),
}
_RETENTION = {
    "max_bytes": _int(0),
    "max_idle_days": _number(0),
    "dry_run": _bool,
}
_TOP_LEVEL = {
    "server",
    "database",
    "cache",
    "storage",
    "auth",
    "registries",
    "limits",
    "ip_blocking",
    "metrics",
    "otel",
    "sweep",
}


def parse_settings(
    raw: Mapping[str, Any], *, data_dir: str | os.PathLike[str] | None = None, source: str = "embedded default"
) -> Settings:
    """Validate merged raw settings into `Settings`. Backend- and format-specific keys are checked
    later by `batlehub.app.check_plugins_config`, which knows the installed plugins."""
    problems = _Problems()
    for key in raw:
        if key not in _TOP_LEVEL:
            problems.add(key, f"unknown section (known: {', '.join(sorted(_TOP_LEVEL))})")

    server = _section(raw, "server", _SERVER, problems)
    database = _section(raw, "database", _DATABASE, problems)
    if database.get("type") == "postgresql" and not database.get("url"):
        problems.add("database.url", 'required when database.type = "postgresql"')
    if database.get("url") and not str(database["url"]).startswith(("postgresql://", "postgres://")):
        problems.add("database.url", f"expected a postgresql:// URL, got {_describe(database['url'])}")

    cache = _backend_table(raw, "cache", "memory", problems)
    storage = _backend_table(raw, "storage", "filesystem", problems)
    limits = _section(raw, "limits", _LIMITS, problems)
    ip_blocking = _section(raw, "ip_blocking", _IP_BLOCKING, problems)
    metrics = _section(raw, "metrics", _METRICS, problems)
    if metrics.get("port") and metrics["port"] == server.get("port", ServerSettings.port):
        problems.add("metrics.port", f"must differ from server.port ({metrics['port']}); 0 serves /metrics there")
    otel = _section(raw, "otel", _OTEL, problems)
    sweep = _section(raw, "sweep", _SWEEP, problems)
    auth = _auth(raw.get("auth", []), problems)
    registries = _registries(raw, problems)

    resolved_dir = Path(data_dir or os.environ.get("BATLEHUB_DATA_DIR") or default_data_dir()).expanduser().absolute()
    if problems.items:
        raise ConfigError(problems.items)
    return Settings(
        data_dir=resolved_dir,
        server=ServerSettings(**server),
        database=DatabaseSettings(**database),
        cache=cache,
        storage=storage,
        auth=auth,
        registries=registries,
        limits=LimitsSettings(**limits),
        ip_blocking=IpBlockingSettings(**ip_blocking),
        metrics=MetricsSettings(**metrics),
        otel=OtelSettings(**otel),
        sweep=SweepSettings(**sweep),
        source=source,
        default_registries="registries" not in raw,
    )


def _backend_table(raw: Mapping[str, Any], name: str, default_type: str, problems: _Problems) -> dict[str, Any]:
    section = raw.get(name, {})
    if not isinstance(section, Mapping):
        problems.add(name, f"expected a table, got {_describe(section)}")
        return {"type": default_type}
    table = dict(section)
    table.setdefault("type", default_type)
    if not isinstance(table["type"], str):
        problems.add(f"{name}.type", f"expected a string, got {_describe(table['type'])}")
        table["type"] = default_type
    return table


def _auth(value: Any, problems: _Problems) -> tuple[AuthSettings, ...]:
    if isinstance(value, Mapping):  # a single [auth] table instead of [[auth]]
        value = [value]
    if not isinstance(value, list):
        problems.add("auth", f"expected a list of tables ([[auth]]), got {_describe(value)}")
        return ()
    out = []
    for i, entry in enumerate(value):
        path = f"auth[{i}]"
        if not isinstance(entry, Mapping):
            problems.add(path, f"expected a table, got {_describe(entry)}")
            continue
        if entry.get("type", "token") != "token":
            problems.add(f"{path}.type", f'expected "token", got {_describe(entry.get("type"))}')
            continue
        for key in entry:
            if key not in ("type", "tokens"):
                problems.add(f"{path}.{key}", "unknown key (known: tokens, type)")
        tokens = []
        raw_tokens = entry.get("tokens", [])
        if not isinstance(raw_tokens, list):
            problems.add(f"{path}.tokens", f"expected a list of tables, got {_describe(raw_tokens)}")
            raw_tokens = []
        for j, token in enumerate(raw_tokens):
            tpath = f"{path}.tokens[{j}]"
            if not isinstance(token, Mapping):
                problems.add(tpath, f"expected a table, got {_describe(token)}")
                continue
            for key in token:
                if key not in ("value", "role", "user_id"):
                    problems.add(f"{tpath}.{key}", "unknown key (known: role, user_id, value)")
            value_ = token.get("value")
            role = token.get("role", "user")
            user_id = token.get("user_id")
            if not isinstance(value_, str) or len(value_) < 8:
                problems.add(f"{tpath}.value", "expected a token of at least 8 characters, or sha256:<hex>")
                continue
            if value_.startswith("sha256:") and not _is_hex(value_[7:], 64):
                problems.add(f"{tpath}.value", "sha256: must be followed by 64 hex digits")
                continue
            if role not in TOKEN_ROLES:
                problems.add(f"{tpath}.role", f'expected "user", "admin" or "metrics", got {_describe(role)}')
                continue
            if not isinstance(user_id, str) or not user_id:
                problems.add(f"{tpath}.user_id", "required: the user this token authenticates")
                continue
            if not valid_user_id(user_id):
                problems.add(f"{tpath}.user_id", "expected 1 to 200 printable characters without spaces")
                continue
            tokens.append(TokenEntry(value=value_, role=role, user_id=user_id))
        out.append(AuthSettings(type="token", tokens=tuple(tokens)))
    return tuple(out)


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdefABCDEF" for c in text)


def _registries(raw: Mapping[str, Any], problems: _Problems) -> tuple[RegistrySettings, ...]:
    if "registries" not in raw:
        return ()  # each installed format adds its default one (`Settings.default_registries`)
    value = raw["registries"]
    if not isinstance(value, list):
        problems.add("registries", f"expected a list of tables ([[registries]]), got {_describe(value)}")
        return ()
    out: list[RegistrySettings] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        path = f"registries[{i}]"
        if not isinstance(entry, Mapping):
            problems.add(path, f"expected a table, got {_describe(entry)}")
            continue
        rtype = entry.get("type")
        name = entry.get("name")
        if not isinstance(rtype, str) or not rtype:
            problems.add(f"{path}.type", 'required: the registry format, e.g. "npm"')
            continue
        if not isinstance(name, str) or not _valid_registry_name(name):
            problems.add(f"{path}.name", f"expected a name of letters, digits, - and _, got {_describe(name)}")
            continue
        if name in seen:
            problems.add(f"{path}.name", f'"{name}" is used by another registry')
            continue
        seen.add(name)
        rbac = _rbac(entry.get("rbac", {}), f"{path}.rbac", problems)
        rate_limit = None
        if "rate_limit" in entry:
            rl = _section(entry, "rate_limit", _RATE_LIMIT, problems, prefix=f"{path}.")
            if "requests_per_window" not in rl:
                problems.add(f"{path}.rate_limit.requests_per_window", "required")
            else:
                rate_limit = RateLimitSettings(rl["requests_per_window"], rl.get("window_secs", 60.0))
        quota = None
        if "quota" in entry:
            quota = QuotaSettings(**_section(entry, "quota", _QUOTA, problems, prefix=f"{path}."))
        retention = None
        if "retention" in entry:
            retention = RetentionSettings(**_section(entry, "retention", _RETENTION, problems, prefix=f"{path}."))
        policy = _policy(entry.get("policy"), f"{path}.policy", problems) if "policy" in entry else None
        options = {k: v for k, v in entry.items() if k not in REGISTRY_CORE_KEYS}
        out.append(RegistrySettings(rtype, name, rbac, rate_limit, quota, options, retention, policy))
    return tuple(out)


def _policy(value: Any, path: str, problems: _Problems) -> PolicyConfig | None:
    from pydantic import ValidationError

    from batlehub.configmodel import problems_of

    try:
        return PolicyConfig.model_validate(value)
    except ValidationError as exc:
        for line in problems_of(exc, PolicyConfig, path=path, owner="[registries.policy]"):
            problems.items.append(line)
        return None


def _valid_registry_name(name: str) -> bool:
    return 0 < len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)


def _rbac(value: Any, path: str, problems: _Problems) -> dict[str, tuple[str, ...]]:
    rbac = dict(DEFAULT_RBAC)
    if not isinstance(value, Mapping):
        problems.add(path, f"expected a table, got {_describe(value)}")
        return rbac
    for role, perms in value.items():
        if role not in ROLES:
            problems.add(f"{path}.{role}", f"unknown role (known: {', '.join(ROLES)})")
            continue
        if not isinstance(perms, list) or not all(isinstance(p, str) for p in perms):
            problems.add(f"{path}.{role}", f"expected a list of permissions, got {_describe(perms)}")
            continue
        bad = [p for p in perms if p not in PERMISSIONS]
        if bad:
            problems.add(f"{path}.{role}", f"unknown permission {bad[0]!r} (known: {', '.join(PERMISSIONS)})")
            continue
        rbac[role] = tuple(perms)
    return rbac
