"""The pytest plugin (entry point `pytest11`) that gives every BatleHub test suite, core and plugins
alike, the same real services and the `hub` factory. See `services.py` and `hub.py`; a format's
own services (npm's Verdaccio and clients) come with that format's test kit."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from batlehub.testing.hub import hub
from batlehub.testing.services import (
    fresh_postgres_url,
    postgres_server,
    postgres_url,
    redis_server,
    redis_url,
    restart_stopped_services,
    s3_config,
    seaweedfs,
)

__all__ = [
    "fresh_postgres_url",
    "hub",
    "postgres_server",
    "postgres_url",
    "redis_server",
    "redis_url",
    "s3_config",
    "seaweedfs",
]


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so that a plugin's own test run (another rootdir, no setup.cfg) knows it.
    config.addinivalue_line("markers", "slow: long-running end-to-end tests")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    # A hook rather than an autouse fixture: it adds no fixture to every test of every suite that
    # loads this plugin, and it runs before the test's fixtures are torn down, whose teardown may
    # need the services it stopped (dropping a fresh database needs PostgreSQL).
    try:
        restart_stopped_services()
    finally:
        yield  # the fixtures are torn down even when a service did not come back
