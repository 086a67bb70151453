"""Fixtures for the npm plugin's in-process tests: a hub app built by `create_app` with local npm
registries (see `npm_testdata.hub_settings`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from npm_testdata import hub_settings

from batlehub.config import Settings


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    def factory(**kwargs: Any) -> Settings:
        return hub_settings(tmp_path / "data", **kwargs)

    return factory


@pytest.fixture
async def client(aiohttp_client: Any, settings_factory: Callable[..., Settings]) -> Any:
    from batlehub.app import create_app

    return await aiohttp_client(create_app(settings_factory()))
