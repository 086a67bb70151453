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
import subprocess

from batlehub.api import ClientConfig, DefaultRegistry, Settings

NAME = "pypi"
_PIP_DEFAULT = re.compile(r"--index-url\b.{0,300}?\(default\s+(https?://[^\s)]+)\)", re.DOTALL)
"""pip's own help for `--index-url`: "Base URL of the Python Package Index (default <url>)"."""
_PIP_TIMEOUT_SECS = 15


def _pip_default(pip: str) -> tuple[str | None, str]:
    default = pip_default_index(pip)
    if default is None:
        return None, "pip names no default index"
    return default, f"pip's own default, as `{pip} install --help` names it"


PIP_CLIENT = ClientConfig(
    env_keys=("PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"),
    programs=("pip3", "pip"),
    config_get=("config", "get", "global.index-url"),
    client="your pip",
    noun="index",
    missing="no pip or uv index configuration found",
    add_upstream=(
        'add a [[registries]] entry (type = "pypi", name = "pypi", mode = "hybrid",'
        ' upstreams = ["<your upstream index URL>/simple/"]) or set PIP_INDEX_URL before starting'
    ),
    fallback=_pip_default,
)


def default_registry(settings: Settings) -> DefaultRegistry:
    return PIP_CLIENT.default_registry(NAME, settings)


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
