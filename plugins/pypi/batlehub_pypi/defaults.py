"""PyPI's part of the embedded default: with no `[[registries]]` configured, one hybrid registry
named `pypi` that proxies the index the user's own pip (or uv) is configured with, and the lines
that point pip, uv and twine at it.

The upstream is read from the user's configuration (`PIP_INDEX_URL`, `UV_DEFAULT_INDEX`,
`UV_INDEX_URL`, else `pip config get global.index-url`), and with none set it is the index the
installed pip uses by default, as that pip itself says (`pip install --help` names it): the project
names no index itself. A configuration that already points at this hub would make it its own
upstream; that is detected and said instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from batlehub.api import DefaultRegistry, Settings, points_at_this_hub

NAME = "pypi"
_ENV_KEYS = ("PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL")
_PIP_DEFAULT = re.compile(r"--index-url\b.{0,300}?\(default\s+(https?://[^\s)]+)\)", re.DOTALL)
"""pip's own help for `--index-url`: "Base URL of the Python Package Index (default <url>)"."""
_PIP_TIMEOUT_SECS = 15
_ADD_UPSTREAM = (
    'add a [[registries]] entry (type = "pypi", name = "pypi", mode = "hybrid",'
    ' upstreams = ["<your upstream index URL>/simple/"]) or set PIP_INDEX_URL before starting'
)


def default_registry(settings: Settings) -> DefaultRegistry:
    url, source = user_index()
    if url is None:
        return DefaultRegistry(
            NAME,
            {"mode": "hybrid", "upstreams": []},
            note=f"no pip or uv index configuration found, so nothing is proxied: {_ADD_UPSTREAM}",
        )
    if points_at_this_hub(url, settings):
        return DefaultRegistry(
            NAME,
            {"mode": "hybrid", "upstreams": []},
            note=(
                f"your pip already uses this hub ({url}, from {source}), so it cannot be the upstream"
                f" and nothing is proxied: {_ADD_UPSTREAM}"
            ),
        )
    return DefaultRegistry(
        NAME,
        {"mode": "hybrid", "upstreams": [url]},
        note=f"proxying {url}, the index your pip uses (from {source})",
    )


def user_index() -> tuple[str | None, str]:
    """The index URL the user's pip (or uv) is configured with, and where it came from."""
    for key in _ENV_KEYS:
        value = os.environ.get(key, "").strip()
        if value:
            return (value if _is_url(value) else None), key
    pip = shutil.which("pip3") or shutil.which("pip")
    if pip is None:
        return None, "pip is not installed"
    try:
        found = subprocess.run(
            [pip, "config", "get", "global.index-url"],
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_SECS,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None, "pip config get global.index-url failed"
    value = found.stdout.strip()
    if found.returncode == 0 and value:
        return (value if _is_url(value) else None), "pip config get global.index-url"
    default = pip_default_index(pip)
    if default is None:
        return None, "pip names no default index"
    return default, f"pip's own default, as `{pip} install --help` names it"


def pip_default_index(pip: str) -> str | None:
    """The index `pip` installs from when nothing is configured, as that pip's own help names it
    (read with its configuration files and PIP_* variables switched off, so it is pip's default,
    not a setting); None when it cannot tell."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PIP_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "COLUMNS": "200"})
    try:
        found = subprocess.run(
            [pip, "install", "--help"],
            capture_output=True,
            text=True,
            timeout=_PIP_TIMEOUT_SECS,
            check=False,
            env=env,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _PIP_DEFAULT.search(found.stdout) if found.returncode == 0 else None
    return match.group(1) if match else None


def usage(registry_url: str) -> list[str]:
    base = registry_url.rstrip("/")
    return [
        "in ~/.config/pip/pip.conf:",
        "[global]",
        f"index-url = {base}/simple/",
        f"uv: UV_DEFAULT_INDEX={base}/simple/",
        f"twine: twine upload --repository-url {base}/ -u __token__ -p <a token> dist/*",
    ]


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))
