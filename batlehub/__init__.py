"""BatleHub: a package registry hub that proxies, caches and hosts packages.

Registry formats, cache backends and storage backends are pluggy plugins (see `hookspecs`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("batlehub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
