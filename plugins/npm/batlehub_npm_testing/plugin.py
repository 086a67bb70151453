"""The npm test kit's pytest plugin (entry point `pytest11`): the `node_tools` and `verdaccio`
fixtures and the markers of npm's end-to-end tests. PostgreSQL, Redis, S3 and the `hub` factory
come from `batlehub.testing`'s plugin, which is installed with BatleHub."""

from __future__ import annotations

import pytest

from batlehub_npm_testing.services import node_tools, verdaccio

__all__ = ["node_tools", "verdaccio"]


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so that a plugin's own test run (another rootdir, no setup.cfg) knows them.
    config.addinivalue_line("markers", "npm_cli: tests that drive the real npm, pnpm or yarn clients")
    config.addinivalue_line("markers", "ha: several replicas behind nginx, rolling restarts and faults")
