"""The npm format's own keys of a `[[registries]]` entry: mode, upstreams and the proxy cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batlehub.api import BatleHubError
from batlehub_npm.names import parse_package_name, split_spec, validate_version

MODES = ("proxy", "local", "hybrid")
_CACHE_KEYS = {"metadata_ttl_secs", "serve_stale", "warm_packages"}
_KNOWN_KEYS = {"mode", "upstreams", "cache"}


@dataclass(frozen=True)
class NpmOptions:
    mode: str
    upstreams: tuple[str, ...]
    metadata_ttl_secs: float
    serve_stale: bool
    warm_packages: tuple[str, ...]


def options_of(raw: Mapping[str, Any]) -> NpmOptions:
    cache = raw.get("cache") or {}
    return NpmOptions(
        mode=raw.get("mode", "hybrid"),
        upstreams=tuple(u.rstrip("/") + "/" for u in raw.get("upstreams") or ()),
        metadata_ttl_secs=float(cache.get("metadata_ttl_secs", 300)),
        serve_stale=bool(cache.get("serve_stale", True)),
        warm_packages=tuple(cache.get("warm_packages") or ()),
    )


def validate_options(raw: Mapping[str, Any]) -> list[str]:
    """Problems of an npm `[[registries]]` entry's own keys, each naming its key."""
    problems = []
    for key in raw:
        if key not in _KNOWN_KEYS:
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(_KNOWN_KEYS))})")
    mode = raw.get("mode", "hybrid")
    if mode not in MODES:
        problems.append(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    upstreams = raw.get("upstreams", [])
    if not isinstance(upstreams, list | tuple) or not all(isinstance(u, str) for u in upstreams):
        problems.append(f"upstreams: expected a list of URLs, got {upstreams!r}")
        upstreams = []
    for i, url in enumerate(upstreams):
        if not url.startswith(("http://", "https://")):
            problems.append(f"upstreams[{i}]: expected an http:// or https:// URL, got {url!r}")
    if mode == "proxy" and not upstreams:
        problems.append('upstreams: required when mode = "proxy" (the upstream registry URLs to cache)')
    cache = raw.get("cache", {})
    if not isinstance(cache, Mapping):
        problems.append(f"cache: expected a table, got {cache!r}")
        return problems
    for key in cache:
        if key not in _CACHE_KEYS:
            problems.append(f"cache.{key}: unknown key (known: {', '.join(sorted(_CACHE_KEYS))})")
    ttl = cache.get("metadata_ttl_secs", 300)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        problems.append(f"cache.metadata_ttl_secs: expected a number of seconds >= 0, got {ttl!r}")
    if not isinstance(cache.get("serve_stale", True), bool):
        problems.append(f"cache.serve_stale: expected true or false, got {cache.get('serve_stale')!r}")
    warm = cache.get("warm_packages", [])
    if not isinstance(warm, list | tuple) or not all(isinstance(w, str) for w in warm):
        problems.append(f'cache.warm_packages: expected a list of "name" or "name@version", got {warm!r}')
    else:
        for i, spec in enumerate(warm):
            name, version = split_spec(spec)
            try:
                parse_package_name(name)
                if version is not None:
                    validate_version(version)
            except BatleHubError as exc:
                problems.append(f"cache.warm_packages[{i}]: {exc.message}")
    return problems
