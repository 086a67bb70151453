"""The PyPI format's own keys of a `[[registries]]` entry: what core's `ProxyOptions` has (mode,
upstream indexes, the proxy cache) and the extra download origins.

`PypiOptions` is the format's `config_model`: core validates an entry with it (reporting each
problem by its key, `registries[0].upstreams[1]: ...`) and the registry reads the result from
`RegistrySettings.validated_options(PypiOptions)`.
"""

from __future__ import annotations

from batlehub.api import ConfigList, HttpUrl, ProxyOptions


class PypiOptions(ProxyOptions):
    """The PyPI format's keys of a `[[registries]]` entry. `upstreams` are simple-index URLs
    (`http://host:port/simple/`), tried in order."""

    upstream_noun = "upstream index URLs"
    files_hosts: ConfigList[HttpUrl] = ()
    """Other origins (scheme, host and port) the upstreams' file links may point at: many indexes
    serve their files from a host of their own. The hub downloads from the upstreams and these
    only."""
