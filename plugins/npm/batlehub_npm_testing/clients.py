"""Drive the real npm, pnpm and yarn clients from tests, isolated from the machine's own config.

Each call to `npm_env` gets a fresh home folder holding the only `.npmrc` (and `.yarnrc`) the
clients will read, and fresh caches, so a test sees every request its client makes and never
reaches a registry outside this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

# Inherited settings that would override the per-test config files.
_CLIENT_ENV_PREFIXES = ("npm_config_", "yarn_", "pnpm_", "corepack_")


def auth_key(registry_url: str) -> str:
    """The `.npmrc` key prefix that scopes a credential to a registry: `//host:port/path/`."""
    parts = urllib.parse.urlsplit(registry_url)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return f"//{parts.netloc}{path}"


def write_npmrc(
    path: Path, registry_url: str, token: str | None = None, extra: Mapping[str, str] | None = None
) -> Path:
    """Write an `.npmrc` that points at `registry_url`, with its token if given."""
    lines = [f"registry={registry_url}"]
    if token:
        lines.append(f"{auth_key(registry_url)}:_authToken={token}")
    lines += [f"{key}={value}" for key, value in (extra or {}).items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def npm_env(
    tmp_path: Path | str,
    registry_url: str,
    token: str | None = None,
    *,
    npmrc: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for npm/pnpm/yarn that uses `registry_url` (with `token`) and nothing else.

    `npmrc` adds lines to the generated `.npmrc` (e.g. `{"@scope:registry": url}`).
    """
    base = Path(tmp_path) / f"npm-{uuid.uuid4().hex[:8]}"
    home = base / "home"
    npmrc_path = write_npmrc(home / ".npmrc", registry_url, token, npmrc)
    # yarn classic reads its own rc file for the registry; JSON strings are valid yarnrc values.
    (home / ".yarnrc").write_text(f"registry {json.dumps(registry_url)}\ndisable-self-update-check true\n")
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith(_CLIENT_ENV_PREFIXES)}
    env.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(base / "xdg-config"),
            "XDG_CACHE_HOME": str(base / "xdg-cache"),
            "XDG_DATA_HOME": str(base / "xdg-data"),
            "XDG_STATE_HOME": str(base / "xdg-state"),
            "npm_config_userconfig": str(npmrc_path),
            "npm_config_registry": registry_url,
            "npm_config_cache": str(base / "npm-cache"),
            "npm_config_store_dir": str(base / "pnpm-store"),
            "npm_config_update_notifier": "false",
            "npm_config_audit": "false",
            "npm_config_fund": "false",
            "YARN_CACHE_FOLDER": str(base / "yarn-cache"),
            "COREPACK_ENABLE_DOWNLOAD_PROMPT": "0",
            # CI servers set this and the clients change behaviour on it (pnpm's frozen lockfile,
            # no progress output); setting it everywhere makes a laptop run match CI.
            "CI": "true",
        }
    )
    return env


def run_npm(
    args: Sequence[str],
    cwd: Path | str,
    env: Mapping[str, str],
    *,
    npm: str | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run a client (npm by default; pass `npm=node_tools.pnpm` or `.yarn` for the others).

    Returns the completed process with text output; does not raise on a non-zero exit, so a test
    can assert on failures too. A hung client fails the test after `timeout` seconds.
    """
    executable = npm or shutil.which("npm") or "npm"
    return subprocess.run(
        [executable, *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def make_package(
    tmpdir: Path | str,
    name: str,
    version: str,
    dependencies: Mapping[str, str] | None = None,
    files: Mapping[str, str | bytes] | None = None,
    **manifest: object,
) -> Path:
    """Write a publishable package folder (package.json plus index.js) and return its path.

    `files` adds or replaces files by relative path; extra keyword arguments go into package.json.
    """
    folder = Path(tmpdir) / f"{name.replace('/', '__').lstrip('@')}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    package = {
        "name": name,
        "version": version,
        "description": f"test package {name}",
        "main": "index.js",
        "license": "MIT",
        "dependencies": dict(dependencies or {}),
        **manifest,
    }
    (folder / "package.json").write_text(json.dumps(package, indent=2) + "\n")
    (folder / "index.js").write_text(f"module.exports = {json.dumps(f'{name}@{version}')};\n")
    for relative, content in (files or {}).items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return folder


def publish_package(
    package_dir: Path | str,
    registry_url: str,
    token: str,
    *,
    scratch: Path | str,
    npm: str | None = None,
    tag: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`npm publish` a package folder to `registry_url`; raises with npm's output if it fails."""
    env = npm_env(scratch, registry_url, token)
    args = ["publish", *(["--tag", tag] if tag else [])]
    result = run_npm(args, cwd=package_dir, env=env, npm=npm)
    if result.returncode != 0:
        raise RuntimeError(
            f"npm publish of {package_dir} to {registry_url} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def output(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a client printed (npm writes errors to stderr, results to stdout)."""
    return result.stdout + result.stderr


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The client's stdout, after asserting it succeeded (showing all it printed if not)."""
    assert result.returncode == 0, output(result)
    return result.stdout
