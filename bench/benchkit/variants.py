"""Hubs that differ only in configuration (or in code), measured side by side on the same machine.

`ConfiguredHub` is `BenchHub` with extra TOML sections (`[metrics]`, `[otel]`...); `Scraper` reads
`/metrics` at a fixed interval while load runs, as Prometheus would; `code_at` extracts BatleHub's
packages at a git revision, to run an older build next to the working tree's (on `PYTHONPATH`, it
wins over the editable installs); `summarize` reduces interleaved runs to medians and ratios.
"""

from __future__ import annotations

import statistics
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchkit import BenchError
from benchkit.servers import ADMIN_TOKEN, REPO, BenchHub, HubRegistry


class ConfiguredHub(BenchHub):
    """A `BenchHub` whose config file ends with `extra` (TOML sections such as `[metrics]`)."""

    def __init__(self, root: Path, registries: list[HubRegistry], *, extra: str = "", **kw: Any) -> None:
        self.extra = extra
        super().__init__(root, registries, **kw)

    def _config_text(self, registries: list[HubRegistry]) -> str:
        text = super()._config_text(registries)
        return text + ("\n" + self.extra.strip() + "\n" if self.extra.strip() else "")


class Scraper:
    """Reads `url` every `interval` seconds in a thread (with the admin token), like a Prometheus
    scrape job; counts the scrapes and keeps the last body."""

    def __init__(self, url: str, interval: float, *, token: str = ADMIN_TOKEN, offset: float = 0.0) -> None:
        self.url = url
        self.interval = interval
        self.offset = offset
        self.token = token
        self.scrapes = 0
        self.failures: list[str] = []
        self.last = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape(self) -> bytes:
        request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return bytes(response.read())

    def _run(self) -> None:
        if self._stop.wait(self.offset):
            return
        while not self._stop.is_set():
            try:
                self.last = self.scrape()
                self.scrapes += 1
            except (OSError, urllib.error.URLError) as exc:
                self.failures.append(str(exc))
            self._stop.wait(self.interval)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def metric_value(exposition: bytes, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in exposition.decode().splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def code_at(revision: str, dest: Path) -> Path:
    """BatleHub's core and npm packages as they were at `revision`, in `dest` (for `PYTHONPATH`)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / "code.tar"
    paths = ["batlehub", "plugins/npm/batlehub_npm"]
    result = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), revision, *paths],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise BenchError(f"git archive {revision} failed: {result.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "tree", filter="data")
    archive.unlink()
    # Both packages side by side at the top of the folder, as the editable installs lay them out.
    (dest / "tree" / "plugins" / "npm" / "batlehub_npm").rename(dest / "tree" / "batlehub_npm")
    return dest / "tree"


def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.2)


def median(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def summarize(runs: list[dict[str, Any]], variant: str, connections: int) -> dict[str, Any]:
    """Medians of one variant's runs at one concurrency."""
    mine = [r for r in runs if r["variant"] == variant and r["connections"] == connections]
    return {
        "runs": len(mine),
        "rps": median(r["rps"] for r in mine),
        "p99_ms": median(r["p99_ms"] for r in mine),
        "rps_per_cpu": median(r["rps_per_cpu"] for r in mine),
        "rps_all": [r["rps"] for r in mine],
    }


def paired_ratios(runs: list[dict[str, Any]], variant: str, base: str, connections: int) -> list[float]:
    """`variant`/`base` requests/s of each round (the two ran within seconds of each other)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["connections"] == connections and r["variant"] in (variant, base):
            by_round.setdefault(r["round"], {})[r["variant"]] = r["rps"]
    return [pair[variant] / pair[base] for pair in by_round.values() if len(pair) == 2 and pair[base]]
