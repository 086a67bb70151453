"""Drive the real pip, uv and twine from tests, isolated from the machine's own configuration.

This machine (and many developers' ones) configures pip globally: a pip.conf with `find-links`
and extra indexes, a constraints file, `PIP_*` variables. A client that read any of them would
find packages without asking the index under test, so every call here gets an environment with
no inherited pip, uv or twine settings, a config file of `/dev/null` and fresh caches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

_CLIENT_ENV_PREFIXES = ("PIP_", "UV_", "TWINE_", "PYTHONPATH")
CLIENT_TIMEOUT_SECS = 300


def client_env(scratch: Path | str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment for pip, uv and twine that reads no configuration but what a test passes."""
    base = Path(scratch) / f"py-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_CLIENT_ENV_PREFIXES)}
    env.update(
        {
            "HOME": str(base / "home"),
            "XDG_CONFIG_HOME": str(base / "xdg-config"),
            "XDG_CACHE_HOME": str(base / "xdg-cache"),
            "PIP_CONFIG_FILE": os.devnull,
            "PIP_CACHE_DIR": str(base / "pip-cache"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
            "PIP_PROGRESS_BAR": "off",
            "UV_NO_CONFIG": "1",
            "UV_CACHE_DIR": str(base / "uv-cache"),
            "UV_PYTHON_DOWNLOADS": "never",
            "NO_COLOR": "1",
            "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
        }
    )
    (base / "home").mkdir(parents=True, exist_ok=True)
    env.update(extra or {})
    return env


def uv_bin() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_SECS
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a client run that must have succeeded (else fail with all it said)."""
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(result.args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-4000:]}"
        )
    return result.stdout + result.stderr


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def pip(args: Sequence[str], env: Mapping[str, str], cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m pip ARGS` with the test interpreter's pip."""
    return run([sys.executable, "-m", "pip", *args], env, cwd)


def pip_install(
    index_url: str,
    requirements: Sequence[str],
    target: Path,
    env: Mapping[str, str],
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """`pip install --target TARGET` from `index_url` only."""
    return pip(
        [
            "install",
            "--index-url",
            index_url,
            "--target",
            str(target),
            "--no-warn-script-location",
            *extra,
            *requirements,
        ],
        env,
    )


def uv(args: Sequence[str], env: Mapping[str, str], cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    return run([uv_bin(), *args], env, cwd)


def uv_pip_install(
    index_url: str,
    requirements: Sequence[str],
    target: Path,
    env: Mapping[str, str],
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    """`uv pip install --target TARGET` from `index_url` only, with the test interpreter."""
    return uv(
        [
            "pip",
            "install",
            "--python",
            sys.executable,
            "--index-url",
            index_url,
            "--target",
            str(target),
            *extra,
            *requirements,
        ],
        env,
    )


def twine_upload(
    repository_url: str, files: Sequence[Path | str], env: Mapping[str, str], token: str | None = None, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`twine upload` with `__token__` and `token` as its password (none: no credentials)."""
    argv = [sys.executable, "-m", "twine", "upload", "--non-interactive", "--disable-progress-bar"]
    argv += ["--repository-url", repository_url]
    if token is not None:
        argv += ["-u", "__token__", "-p", token]
    return run([*argv, *extra, *(str(f) for f in files)], env)
