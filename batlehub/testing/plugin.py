"""The pytest plugin (entry point `pytest11`) that gives every BatleHub test suite, core and plugins
alike, the same real services and the `hub` factory. See `services.py` and `hub.py`."""

from __future__ import annotations

import pytest

from batlehub.testing.hub import hub
from batlehub.testing.services import (
    fresh_postgres_url,
    node_tools,
    postgres_server,
    postgres_url,
    redis_server,
    redis_url,
    restart_stopped_services,
    s3_config,
    seaweedfs,
    verdaccio,
)

__all__ = [
    "fresh_postgres_url",
    "hub",
    "node_tools",
    "postgres_server",
    "postgres_url",
    "redis_server",
    "redis_url",
    "restart_stopped_services",
    "s3_config",
    "seaweedfs",
    "verdaccio",
]


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so that a plugin's own test run (another rootdir, no setup.cfg) knows them.
    config.addinivalue_line("markers", "slow: long-running end-to-end tests")
    config.addinivalue_line("markers", "npm_cli: tests that drive the real npm, pnpm or yarn clients")
    config.addinivalue_line("markers", "ha: several replicas behind nginx, rolling restarts and faults")
