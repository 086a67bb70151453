"""The PyPI test kit's pytest plugin (entry point `pytest11`): the `pypiserver` fixture and the
marker of PyPI's end-to-end tests. PostgreSQL, Redis, S3 and the `hub` factory come from
`batlehub.testing`'s plugin, which is installed with BatleHub."""

from __future__ import annotations

import pytest

from batlehub_pypi_testing.services import pypiserver

__all__ = ["pypiserver"]


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so that a plugin's own test run (another rootdir, no setup.cfg) knows it.
    config.addinivalue_line("markers", "pypi_cli: tests that drive the real pip, uv or twine clients")
