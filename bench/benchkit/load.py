"""Load generation with wrk, and RSS sampling of the server while it runs.

Headers are set in a generated wrk Lua script (the same ones the npm CLI sends), and the script's
`done` hook prints the summary as one JSON line, so nothing depends on wrk's human-readable output.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from benchkit import BenchError

# What npm sends for installs (abbreviated "corgi" documents), and for everything else.
NPM_ABBREVIATED_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
NPM_HEADERS = {"Accept-Encoding": "gzip,deflate", "User-Agent": "npm/11 node/v20 linux x64 workspaces/false"}

_LUA = """
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """One wrk run. Latencies are in milliseconds."""

    url: str
    connections: int
    duration_s: float
    requests: int
    rps: float
    bytes_per_sec: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    errors: int
    """Socket errors, timeouts and non-2xx/3xx responses: any of them makes the run invalid."""
    peak_rss: dict[str, int]
    """Highest RSS seen per watched process during the run (bytes)."""
    server_cpu_s: float | None
    """CPU seconds (user + system) the server's processes used during the run."""
    rps_per_cpu: float | None
    """Requests per server CPU-second: throughput normalized for what the shared machine gave it."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def lua_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of some processes so far (0 for processes that are gone)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def rss_of_pids(pids: list[int]) -> dict[int, int]:
    from benchkit.servers import rss_bytes

    return {pid: rss_bytes(pid) for pid in pids}


class RssSampler:
    """Samples the RSS of some processes every `interval` seconds in a thread; keeps the peak."""

    def __init__(self, pids: Callable[[], Mapping[int, int]], interval: float = 0.1) -> None:
        self._pids = pids
        self.interval = interval
        self.peak: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid, rss in self._pids().items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_wrk(
    wrk: str,
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Mapping[str, str],
    pids: Callable[[], list[int]] | None = None,
    threads: int = 1,
) -> LoadResult:
    """Run wrk against one URL. One wrk thread by default: on a 2-core machine the server under
    test keeps the other core, and every server is measured under the same handicap."""
    header_lines = "\n".join(f"wrk.headers[{lua_quote(k)}] = {lua_quote(v)}" for k, v in headers.items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA.format(headers=header_lines))
    argv = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "-s",
        script.name,
        url,
    ]
    server_pids = pids() if pids else []
    sampler = RssSampler(lambda: rss_of_pids(server_pids))
    cpu_before = cpu_seconds(server_pids)
    try:
        with sampler:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
        cpu = cpu_seconds(server_pids) - cpu_before if server_pids else None
    finally:
        Path(script.name).unlink(missing_ok=True)
    line = next((x for x in result.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(f"wrk failed on {url} ({result.returncode}):\n{result.stdout}{result.stderr}")
    data = json.loads(line[len("WRKJSON ") :])
    seconds = data["duration_us"] / 1e6
    errors = data["connect"] + data["read"] + data["write"] + data["status"] + data["timeout"]
    return LoadResult(
        url=url,
        connections=connections,
        duration_s=round(seconds, 2),
        requests=data["requests"],
        rps=round(data["requests"] / seconds, 1),
        bytes_per_sec=round(data["bytes"] / seconds),
        p50_ms=data["p50"] / 1000,
        p90_ms=data["p90"] / 1000,
        p99_ms=data["p99"] / 1000,
        max_ms=data["max"] / 1000,
        mean_ms=round(data["mean"] / 1000, 3),
        errors=errors,
        peak_rss={str(pid): rss for pid, rss in sampler.peak.items()},
        server_cpu_s=None if cpu is None else round(cpu, 2),
        rps_per_cpu=round(data["requests"] / cpu, 1) if cpu else None,
    )


def wall_time(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
