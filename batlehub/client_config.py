"""The embedded default's upstream, as the user's own client is configured: what a format's
`default_registry` hook needs to proxy, with no `[[registries]]` at all, whatever registry or
index the user's npm, pip or other client already uses.

The hub names no registry itself: the URL comes from the client's environment variables or its
own `config get` command. A URL that reaches this hub would make it its own upstream; that is
detected and said instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from batlehub.config import Settings
from batlehub.guide import points_at_this_hub
from batlehub.interfaces import DefaultRegistry


@dataclass(frozen=True)
class ClientConfig:
    """Where a format's client keeps its upstream URL, and how the default's note names things."""

    env_keys: tuple[str, ...]
    """Environment variables that hold the URL, the first one set wins."""
    programs: tuple[str, ...]
    """The client's executables, the first one found is asked (the last one names it in notes)."""
    config_get: tuple[str, ...]
    """The arguments that make the client print its URL (`config get registry`)."""
    client: str
    """How notes name the user's client: "your npm client"."""
    noun: str
    """What the client's upstream is called: "registry", "index"."""
    missing: str
    """The note's words when no URL is configured: "no npm client configuration found"."""
    add_upstream: str
    """The setting to add for a proxy when none could be read."""
    fallback: Callable[[str], tuple[str | None, str]] | None = None
    """Asked with the client's executable when its configuration names no URL: the URL the client
    uses by default, as the client itself says (pip's own default index), and where it came from."""

    def configured_url(self) -> tuple[str | None, str]:
        """The URL the user's client is configured with (None when none is), and where it came from."""
        for key in self.env_keys:
            value = os.environ.get(key, "").strip()
            if value:
                return (value if _is_url(value) else None), key
        program = next((found for found in map(shutil.which, self.programs) if found), None)
        if program is None:
            return None, f"{self.programs[-1]} is not installed"
        command = " ".join((self.programs[-1], *self.config_get))
        try:
            found = subprocess.run([program, *self.config_get], capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.SubprocessError):
            return None, f"{command} failed"
        value = found.stdout.strip()
        if found.returncode == 0 and value:
            return (value if _is_url(value) else None), command
        if self.fallback is not None:
            return self.fallback(program)
        return None, command

    def default_registry(self, name: str, settings: Settings) -> DefaultRegistry:
        """One hybrid registry named `name` that proxies the client's configured URL, when there
        is one that is not this hub; else one that proxies nothing, with a note that says why."""
        url, source = self.configured_url()
        if url is None:
            return DefaultRegistry(
                name,
                {"mode": "hybrid", "upstreams": []},
                note=f"{self.missing}, so nothing is proxied: {self.add_upstream}",
            )
        if points_at_this_hub(url, settings):
            return DefaultRegistry(
                name,
                {"mode": "hybrid", "upstreams": []},
                note=(
                    f"{self.client} already uses this hub ({url}, from {source}), so it cannot be the upstream"
                    f" and nothing is proxied: {self.add_upstream}"
                ),
            )
        return DefaultRegistry(
            name,
            {"mode": "hybrid", "upstreams": [url]},
            note=f"proxying {url}, the {self.noun} {self.client} uses (from {source})",
        )


def _is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))
