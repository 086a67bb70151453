"""What a newcomer needs after `batlehub serve`: where each registry is, whether it proxies
anything, the lines to paste into each client's configuration, and where the admin token is.
Written to the start-up log, and shown on the front page."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batlehub.config import RegistrySettings, Settings
from batlehub.interfaces import RegistryFormatType
from batlehub.requests import registry_path

_ANY_ADDRESS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class RegistryGuide:
    name: str
    type: str
    mode: str | None
    url: str
    upstreams: tuple[str, ...]
    usage: tuple[str, ...]
    """Lines to paste into the format's client configuration."""

    def upstream_line(self) -> str:
        if self.upstreams:
            return "upstream: " + ", ".join(self.upstreams)
        if self.mode == "local":
            return "local packages only"
        return (
            "no upstream: only packages published here are served"
            f" (set upstreams in the [[registries]] entry named {self.name!r} to proxy your upstream registry)"
        )


def base_url(settings: Settings) -> str:
    """How clients on this machine reach the hub: `server.public_url`, else the listen address."""
    if settings.server.public_url:
        return settings.server.public_url.rstrip("/")
    host = settings.server.host
    host = "localhost" if host in _ANY_ADDRESS else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{settings.server.port}"


def registry_guides(
    settings: Settings, formats: dict[str, RegistryFormatType], base: str, names: set[str] | None = None
) -> list[RegistryGuide]:
    """Each registry (of `names`, when given) as reached under `base`."""
    guides = []
    for registry in settings.registries:
        if names is not None and registry.name not in names:
            continue
        url = base + registry_path(registry.name)
        fmt = formats.get(registry.type)
        usage = tuple(fmt.usage(url)) if fmt is not None and fmt.usage is not None else ()
        guides.append(
            RegistryGuide(
                name=registry.name,
                type=registry.type,
                mode=_option(registry, "mode"),
                url=url,
                upstreams=tuple(_option(registry, "upstreams") or ()),
                usage=usage,
            )
        )
    return guides


def admin_token_file(settings: Settings) -> Path | None:
    """The first-start admin token's file, when that is how this hub is administered."""
    if any(auth.tokens for auth in settings.auth):
        return None
    path = settings.data_dir / "admin.token"
    return path if path.exists() else None


def startup_lines(settings: Settings, formats: dict[str, RegistryFormatType]) -> list[str]:
    lines = []
    for guide in registry_guides(settings, formats, base_url(settings)):
        lines.append(f"registry {guide.name} ({guide.type}, {guide.mode or 'default mode'}): {guide.url}")
        lines.append(f"  {guide.upstream_line()}")
        if guide.usage:
            lines.append("  to use it:")
            lines.extend(f"    {line}" for line in guide.usage)
    token = admin_token_file(settings)
    if token is not None:
        lines.append(
            f"admin token: in {token}; create tokens for your users with POST /api/v1/admin/tokens (see the README)"
        )
    return lines


def _option(registry: RegistrySettings, key: str) -> Any:
    options = registry.options
    return options.get(key) if isinstance(options, dict) else getattr(options, key, None)


def points_at_this_hub(url: str, settings: Settings) -> bool:
    """Whether `url` reaches this hub (its public URL, or its port on this machine): a default
    upstream read from a client's configuration must never be the hub itself."""
    public = settings.server.public_url.rstrip("/")
    if public and url.rstrip("/").startswith(public):
        return True
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return port == settings.server.port and _is_this_machine(parts.hostname or "", settings.server.host)


def _is_this_machine(host: str, listen_host: str) -> bool:
    if host in ("localhost", listen_host):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host in {socket.gethostname(), socket.getfqdn()}
    if address.is_loopback or address.is_unspecified:
        return True
    try:
        mine = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return False
    return str(address) in mine
