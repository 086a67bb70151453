"""Configuration as an operator meets it: the embedded default, a TOML file, environment overrides,
and validation messages that name the key and list every problem at once."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

from batlehub.app import check_plugins_config, installed_types, with_default_registries
from batlehub.config import load_settings, parse_settings
from batlehub.errors import ConfigError
from batlehub.plugins import get_plugin_manager


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No BATLEHUB_* variable of the developer's shell may leak into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("BATLEHUB_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batlehub.toml"
    path.write_text(text)
    return path


def problems_of(raw: dict, **kw: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, **kw)  # type: ignore[arg-type]
    return info.value.problems


# --- embedded default ------------------------------------------------------------------------------


def test_embedded_default_is_one_hybrid_registry_per_format_with_anonymous_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", "http://127.0.0.1:9/")  # where the user's npm points
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # and the user's pip
    loaded = load_settings(None)
    assert loaded.default_registries and loaded.registries == ()
    settings = with_default_registries(loaded, installed_types(get_plugin_manager()))
    assert settings.source == "embedded default"
    assert settings.data_dir == tmp_path / "xdg" / "batlehub"
    assert settings.database.type == "sqlite"
    assert settings.sqlite_path == tmp_path / "xdg" / "batlehub" / "batlehub.db"
    assert settings.cache["type"] == "memory"
    assert settings.storage["type"] == "filesystem"
    assert settings.auth == ()
    pypi_installed = importlib.util.find_spec("batlehub_pypi") is not None
    assert [(r.type, r.name) for r in settings.registries] == [("npm", "npm")] + (
        [("pypi", "pypi")] if pypi_installed else []
    )
    if pypi_installed:
        pypi = settings.registry("pypi")
        assert pypi is not None and pypi.options == {"mode": "hybrid", "upstreams": ["http://127.0.0.1:9/simple/"]}
    npm = settings.registry("npm")
    assert npm is not None
    assert npm.options["mode"] == "hybrid"
    assert npm.options["upstreams"] == ["http://127.0.0.1:9/"]
    assert "releases:read" in npm.rbac["anonymous"]
    assert "source:read" in npm.rbac["anonymous"]
    assert "releases:publish" not in npm.rbac["anonymous"]
    assert npm.rate_limit is None and npm.quota is None


def test_data_dir_argument_wins_over_xdg(tmp_path: Path) -> None:
    settings = load_settings(None, data_dir=tmp_path / "elsewhere")
    assert settings.data_dir == tmp_path / "elsewhere"
    assert settings.sqlite_path == tmp_path / "elsewhere" / "batlehub.db"


# --- file and environment ----------------------------------------------------------------------------


def test_toml_file_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
host = "127.0.0.1"
port = 8123
trusted_proxies = ["10.0.0.0/8"]

[database]
type = "postgresql"
url = "postgresql://u@db/x"

[[registries]]
type = "npm"
name = "internal"
mode = "local"
[registries.rate_limit]
requests_per_window = 5
[registries.quota]
max_versions_per_user = 3
enforcement = "warn"
""",
    )
    settings = load_settings(path)
    assert settings.source == str(path)
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8123
    assert [str(n) for n in settings.server.trusted_proxies] == ["10.0.0.0/8"]
    assert settings.database.type == "postgresql"
    assert settings.database.url == "postgresql://u@db/x"
    (registry,) = settings.registries
    assert registry.name == "internal"
    assert registry.options == {"mode": "local"}
    assert registry.rate_limit is not None and registry.rate_limit.requests_per_window == 5
    assert registry.rate_limit.window_secs == 60
    assert registry.quota is not None and registry.quota.max_versions_per_user == 3
    assert registry.quota.enforcement == "warn"


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 8124\n")
    monkeypatch.setenv("BATLEHUB_CONFIG", str(path))
    assert load_settings(None).server.port == 8124


def test_environment_override_wins_over_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[server]\nport = 8081\nhost = "127.0.0.1"\n')
    monkeypatch.setenv("BATLEHUB_SERVER__PORT", "9000")
    settings = load_settings(path)
    assert settings.server.port == 9000
    assert settings.server.host == "127.0.0.1"  # the rest of the section survives the merge


def test_environment_override_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATLEHUB_IP_BLOCKING__ENABLED", "true")
    monkeypatch.setenv("BATLEHUB_IP_BLOCKING__VIOLATION_THRESHOLD", "3")
    settings = load_settings(None)
    assert settings.ip_blocking.enabled is True
    assert settings.ip_blocking.violation_threshold == 3


def test_wrong_type_from_environment_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATLEHUB_SERVER__PORT", "abc")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    assert info.value.problems == ['server.port: expected an integer, got "abc"']


def test_cli_only_variables_are_not_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Variables that the CLI itself reads share the prefix but are not config sections."""
    monkeypatch.setenv("BATLEHUB_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("BATLEHUB_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("BATLEHUB_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("BATLEHUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1/x")  # the test harness's
    settings = load_settings(None)
    assert settings.data_dir == tmp_path / "d"


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml")
    assert "nope.toml" in info.value.problems[0]
    assert "does not exist" in info.value.problems[0]


def test_toml_syntax_error_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(info.value.problems) == 1
    assert str(path) in info.value.problems[0] or "batlehub.toml" in info.value.problems[0]


# --- validation ----------------------------------------------------------------------------------------


def test_wrong_type_names_the_key() -> None:
    assert problems_of({"server": {"port": "abc"}}) == ['server.port: expected an integer, got "abc"']


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"server": {"port": 70000}}, "server.port: must be at most 65535"),
        ({"server": {"shutdown_timeout_secs": "soon"}}, 'server.shutdown_timeout_secs: expected a number, got "soon"'),
        ({"server": {"trusted_proxies": ["10.0.0.0/8", "nonsense"]}}, "server.trusted_proxies[1]: expected an IP"),
        ({"server": {"public_url": "ftp://x"}}, "server.public_url: expected an http:// or https:// URL"),
        ({"ip_blocking": {"enabled": "yes"}}, 'ip_blocking.enabled: expected true or false, got "yes"'),
        ({"database": {"type": "oracle"}}, 'database.type: expected one of sqlite, postgresql, got "oracle"'),
        ({"database": {"type": "postgresql"}}, "database.url: required"),
        ({"server": 5}, "server: expected a table, got 5"),
        ({"server": {"shutdown_timeout_secs": float("inf")}}, "server.shutdown_timeout_secs: expected a number"),
        ({"ip_blocking": {"ban_duration_secs": float("nan")}}, "ip_blocking.ban_duration_secs: expected a number"),
    ],
)
def test_bad_values_name_their_key(raw: dict, expected: str) -> None:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_unknown_keys_and_sections_are_reported() -> None:
    problems = problems_of({"server": {"prot": 1}, "serverz": {}})
    assert any(p.startswith("server.prot: unknown key") and "port" in p for p in problems), problems
    assert any(p.startswith("serverz: unknown section") and "server" in p for p in problems), problems


def test_every_problem_is_listed_at_once() -> None:
    problems = problems_of(
        {
            "server": {"port": "abc", "colour": "blue"},
            "limits": {"max_artifact_size_bytes": 0},
            "database": {"max_connections": "many"},
            "registries": [{"type": "npm", "name": "a b"}],
        }
    )
    keys = sorted(p.split(":", 1)[0] for p in problems)
    assert keys == [
        "database.max_connections",
        "limits.max_artifact_size_bytes",
        "registries[0].name",
        "server.colour",
        "server.port",
    ]


def test_sha256_tokens_are_validated() -> None:
    good = "sha256:" + hashlib.sha256(b"secret-token").hexdigest()
    settings = parse_settings(
        {"auth": [{"type": "token", "tokens": [{"value": good, "role": "admin", "user_id": "a"}]}]}
    )
    assert settings.auth[0].tokens[0].value == good
    problems = problems_of(
        {
            "auth": [
                {
                    "type": "token",
                    "tokens": [
                        {"value": "sha256:abc", "role": "admin", "user_id": "a"},
                        {"value": "sha256:" + "z" * 64, "role": "user", "user_id": "b"},
                        {"value": "short", "role": "user", "user_id": "c"},
                        {"value": "long-enough-token", "role": "root", "user_id": "d"},
                        {"value": "long-enough-token2", "role": "user"},
                    ],
                }
            ]
        }
    )
    assert problems == [
        "auth[0].tokens[0].value: sha256: must be followed by 64 hex digits",
        "auth[0].tokens[1].value: sha256: must be followed by 64 hex digits",
        "auth[0].tokens[2].value: expected a token of at least 8 characters, or sha256:<hex>",
        'auth[0].tokens[3].role: expected "user", "admin" or "metrics", got "root"',
        "auth[0].tokens[4].user_id: required: the user this token authenticates",
    ]


def test_unknown_token_key_is_reported() -> None:
    problems = problems_of(
        {"auth": [{"type": "token", "tokens": [{"value": "long-enough", "role": "user", "user_id": "u", "x": 1}]}]}
    )
    assert problems == ["auth[0].tokens[0].x: unknown key (known: role, user_id, value)"]


def test_registries_with_duplicate_names() -> None:
    problems = problems_of({"registries": [{"type": "npm", "name": "npm"}, {"type": "npm", "name": "npm"}]})
    assert problems == ['registries[1].name: "npm" is used by another registry']


def test_rbac_unknown_permission_and_role() -> None:
    problems = problems_of(
        {"registries": [{"type": "npm", "name": "npm", "rbac": {"user": ["releases:write"], "guest": ["*"]}}]}
    )
    assert len(problems) == 2, problems
    assert problems[0].startswith("registries[0].rbac.user: unknown permission 'releases:write'")
    assert "releases:publish" in problems[0]
    assert problems[1].startswith("registries[0].rbac.guest: unknown role")


def test_rbac_overrides_only_the_roles_given() -> None:
    settings = parse_settings({"registries": [{"type": "npm", "name": "npm", "rbac": {"anonymous": []}}]})
    assert settings.registries[0].rbac["anonymous"] == ()
    assert settings.registries[0].rbac["admin"] == ("*",)


def test_rate_limit_and_quota_keys_are_checked() -> None:
    problems = problems_of(
        {
            "registries": [
                {
                    "type": "npm",
                    "name": "npm",
                    "rate_limit": {"window_secs": 10},
                    "quota": {"enforcement": "shout", "max_files": 1},
                }
            ]
        }
    )
    assert sorted(p.split(":", 1)[0] for p in problems) == [
        "registries[0].quota.enforcement",
        "registries[0].quota.max_files",
        "registries[0].rate_limit.requests_per_window",
    ]


def test_empty_registries_list_means_no_registries() -> None:
    assert parse_settings({"registries": []}).registries == ()


# --- checks that need the installed plugins ---------------------------------------------------------


@pytest.fixture
def types():  # type: ignore[no-untyped-def]
    return installed_types(get_plugin_manager(load_entrypoints=False))


def test_unknown_storage_type_names_the_installed_choices(types) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings({"registries": [], "storage": {"type": "gcs"}})
    assert check_plugins_config(settings, types) == [
        '[storage] type "gcs" is not installed (installed: filesystem) — is its plugin installed?'
    ]


def test_unknown_cache_type_and_registry_type_are_both_reported(types) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings({"cache": {"type": "memcached"}, "registries": [{"type": "maven", "name": "m2"}]})
    problems = check_plugins_config(settings, types)
    assert len(problems) == 2, problems
    assert problems[0].startswith('[cache] type "memcached" is not installed (installed: memory, postgres)')
    assert problems[1].startswith('[registries[0]] type "maven" is not installed')


def test_unknown_keys_of_a_backend_section(types) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings(
        {"registries": [], "storage": {"type": "filesystem", "bucket": "x"}, "cache": {"type": "memory", "url": "y"}}
    )
    problems = check_plugins_config(settings, types)
    assert len(problems) == 2, problems
    assert problems[0].startswith("cache.url: unknown key for type 'memory'")
    assert problems[1].startswith("storage.bucket: unknown key for type 'filesystem'")
    assert "path" in problems[1]


def test_known_backend_keys_pass(types, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings(
        {
            "registries": [],
            "storage": {"type": "filesystem", "path": str(tmp_path)},
            "cache": {"type": "postgres", "url": "postgresql://x@y/z"},
        }
    )
    assert check_plugins_config(settings, types) == []


def test_backend_values_are_checked_by_the_descriptors_model(types) -> None:  # type: ignore[no-untyped-def]
    settings = parse_settings(
        {
            "registries": [],
            "storage": {"type": "filesystem", "path": 42},
            "cache": {"type": "postgres", "url": "redis://x", "table_prefix": "Hub"},
        }
    )
    assert check_plugins_config(settings, types) == [
        "cache.url: expected a postgresql:// URL, got 'redis://x'",
        "cache.table_prefix: expected lowercase letters, digits and _ (at most 40), got 'Hub'",
        "storage.path: expected a path, got 42",
    ]


def test_validated_plugin_config_goes_to_the_factories(types, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from batlehub.app import validate_plugins_config
    from batlehub.builtin.storage_filesystem import FilesystemConfig

    settings = parse_settings({"registries": [], "storage": {"path": str(tmp_path / "blobs")}})
    config = validate_plugins_config(settings, types)
    assert config.storage == FilesystemConfig(path=tmp_path / "blobs")
    assert config.registries == ()
    broken = parse_settings({"registries": [], "storage": {"path": 42}})
    with pytest.raises(ConfigError) as info:
        validate_plugins_config(broken, types)
    assert info.value.problems == ["storage.path: expected a path, got 42"]


def test_plugin_keys_are_checked_even_when_the_core_settings_are_not(types) -> None:  # type: ignore[no-untyped-def]
    """check-config lists every problem in one run: the plugins' keys are validated from the raw
    settings when the core's own validation failed."""
    raw = {
        "server": {"port": "abc"},
        "storage": {"path": 42, "bucket": "b"},
        "cache": {"type": "postgres", "table_prefix": "Hub"},
        "registries": [{"type": "maven", "name": "m2"}],
    }
    assert problems_of(raw) == ['server.port: expected an integer, got "abc"']
    assert check_plugins_config(None, types, raw) == [
        # No "cache.url: required": without valid core settings, database.url is unknown.
        "cache.table_prefix: expected lowercase letters, digits and _ (at most 40), got 'Hub'",
        "storage.path: expected a path, got 42",
        "storage.bucket: unknown key for type 'filesystem' (known: path, type)",
        '[registries[0]] type "maven" is not installed (installed: none) — is its plugin installed?',
    ]
