"""Times read from upstream documents (`batlehub.api.epoch_of`): ISO 8601 with or without a zone
(none means UTC, whatever the server's own zone), and anything unreadable is None, never an error."""

from __future__ import annotations

import time
from typing import Any

import pytest

from batlehub.api import epoch_of

NOON = 1_764_676_800.0  # 2025-12-02T12:00:00Z


@pytest.mark.parametrize(
    "value",
    [
        "2025-12-02T12:00:00Z",
        "2025-12-02T12:00:00.000Z",
        "2025-12-02T14:00:00+02:00",
        "2025-12-02T12:00:00",
        " 2025-12-02T12:00:00Z ",
    ],
)
def test_times_with_and_without_a_zone(value: str) -> None:
    assert epoch_of(value) == NOON


def test_a_time_without_a_zone_is_utc_whatever_the_server_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert epoch_of("2025-12-02T12:00:00") == NOON
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("value", [None, 1764676800, "", "yesterday", "2025-13-02T12:00:00Z", "2" * 100, ["x"]])
def test_unreadable_times_are_none(value: Any) -> None:
    assert epoch_of(value) is None
