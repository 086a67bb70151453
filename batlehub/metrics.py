"""Prometheus metrics: what the hub counts, and `GET /metrics` that shows it.

Counting is process-wide (one `HubMetrics`, made by `enable`), like prometheus-client's own
default registry: deep layers (outbound requests, the database, single-flight) count without being
handed an object, and `count_policy_decision` / `count_reclaimed` are plain functions that policy
and retention code calls. With `[metrics] enabled = false` nothing is ever made and every counting
site stops at a None check.

Several workers (`server.workers > 1`) count in prometheus-client's multiprocess mode: the parent
makes a fresh folder (`prepare_worker_folder`) and names it in `PROMETHEUS_MULTIPROC_DIR` before it
starts the workers, each worker writes its values to memory-mapped files there, and whichever
worker answers a scrape adds up every worker's files. So the counts of a scrape are the whole
server's, whichever process the kernel hands the connection to.

Counting on the request path costs: the request series and `Outcomes` add to plain attributes
(`HubMetrics.series`) that `HubMetrics.flush` hands to prometheus-client before every scrape and on
every loop-watch tick (50 ms), so a scrape is exact in one process and cheaper to feed. With
several workers, the worker that answers a scrape shows the others' counts as of their last tick
(at most 50 ms old); writing each count to the shared files at once cost every request a lock and
a write into the memory-mapped file per series (a histogram: per bucket read back at scrape).

Labels are bounded: registry names, formats and route names come from the configuration and the
code, upstream origins from the configuration; never a package name, a client address or a token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from batlehub.config import Settings

log = logging.getLogger("batlehub.server")

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
FOLDER_PREFIX = "batlehub-metrics-"
PATH = "/metrics"
HEALTH_EVERY_SECS = 15.0
"""How often each process checks its backends for `batlehub_backend_up`."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; the SLO alerts (deploy/prometheus/alerts.yml) use the 0.25 and 1.0 bounds."""
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"})
"""Methods named in labels; any other is "other" (a client may send any token as a method)."""


class HubMetrics:
    """Every metric the hub exports (docs/observability.md lists them with their meaning)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- requests ---
        self.requests = Counter(
            "batlehub_http_requests",
            "HTTP requests answered, by registry, route, method and status.",
            ["registry", "format", "route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "batlehub_http_request_duration_seconds",
            "Time from the request's headers to the handler's answer (a file's bytes are sent after).",
            ["registry", "format", "route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.response_bytes = Counter(
            "batlehub_http_response_bytes",
            "Body bytes of the answers (by Content-Length; HEAD and 304 count none).",
            ["registry", "format", "route"],
            registry=r,
        )
        self.in_flight = Gauge(
            "batlehub_http_requests_in_flight",
            "Requests being handled (sampled with the event-loop watch, every 50 ms).",
            multiprocess_mode="livesum",
            registry=r,
        )
        # --- caches of upstream content ---
        self.documents = Counter(
            "batlehub_document_cache_lookups",
            "Upstream documents asked for: hit (fresh copy), miss (asked an upstream or waited for"
            " whoever did), stale (the last good copy, upstreams failing), absent (remembered 404).",
            ["registry", "format", "result"],
            registry=r,
        )
        self.artifacts = Counter(
            "batlehub_artifact_cache_lookups",
            "Upstream artifacts asked for: hit (stored already) or miss (downloaded, or waited for a download).",
            ["registry", "format", "result"],
            registry=r,
        )
        self.singleflight_waits = Counter(
            "batlehub_singleflight_waits",
            "Callers that waited for work another task (scope process) or replica (scope replica) was doing.",
            ["kind", "scope"],
            registry=r,
        )
        # --- upstreams ---
        self.upstream_requests = Counter(
            "batlehub_upstream_requests",
            "HTTP requests sent to upstream registries, by origin and status (error: no answer).",
            ["registry", "origin", "status"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "batlehub_upstream_request_duration_seconds",
            "Time until an upstream's response headers arrived (or the request failed).",
            ["registry", "origin"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "batlehub_upstream_errors",
            "Upstream requests that failed: timeout, connection, status (5xx or unexpected), refused"
            " (outside the configured upstreams).",
            ["registry", "origin", "reason"],
            registry=r,
        )
        # --- backends ---
        self.storage_seconds = Histogram(
            "batlehub_storage_operation_duration_seconds",
            "Storage backend operations (get: until the first bytes).",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.storage_errors = Counter(
            "batlehub_storage_errors", "Storage backend operations that failed.", ["operation"], registry=r
        )
        self.database_seconds = Histogram(
            "batlehub_database_operation_duration_seconds",
            "Database statements and transactions, including the wait for a connection.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.database_errors = Counter(
            "batlehub_database_errors",
            "Database operations that failed (a unique-key conflict is an answer, not an error).",
            ["operation"],
            registry=r,
        )
        self.cache_errors = Counter(
            "batlehub_cache_errors",
            "Cache backend calls that failed on a request path (they fail open: miss, no limit).",
            ["operation"],
            registry=r,
        )
        self.backend_up = Gauge(
            "batlehub_backend_up",
            "1 when the backend answered its last health check, else 0 (worst of the workers).",
            ["backend"],
            multiprocess_mode="livemin",
            registry=r,
        )
        # --- decisions ---
        self.rate_limit = Counter(
            "batlehub_rate_limit_decisions",
            "Requests to rate-limited registries: allowed or limited (429).",
            ["registry", "decision"],
            registry=r,
        )
        self.ip_block = Counter(
            "batlehub_ip_block_decisions",
            "refused: a request from a blocked address (403); banned: an address blocked automatically.",
            ["decision"],
            registry=r,
        )
        self.quota = Counter(
            "batlehub_quota_exceeded",
            "Writes over a user's quota: refused (enforcement block) or warned (enforcement warn).",
            ["registry", "action"],
            registry=r,
        )
        self.policy = Counter(
            "batlehub_policy_decisions",
            "Supply-chain policy decisions, by decision and the rule that made it.",
            ["registry", "decision", "rule"],
            registry=r,
        )
        self.publishes = Counter(
            "batlehub_publishes",
            "Versions published (published), and publishes refused (refused: 4xx) or failed (failed: 5xx).",
            ["registry", "format", "result"],
            registry=r,
        )
        self.published_bytes = Counter(
            "batlehub_published_bytes", "Bytes of the files of published versions.", ["registry", "format"], registry=r
        )
        self.reclaimed_bytes = Counter(
            "batlehub_reclaimed_bytes",
            "Storage bytes freed: by the orphan sweep (source sweep) or retention (source retention).",
            ["source", "registry"],
            registry=r,
        )
        self.reclaimed_blobs = Counter(
            "batlehub_reclaimed_blobs", "Stored blobs deleted, by source.", ["source", "registry"], registry=r
        )
        # --- the process ---
        self.loop_lag = Histogram(
            "batlehub_event_loop_lag_seconds",
            "How late a 50 ms timer woke: how long the event loop was kept from serving.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_worst = Gauge(
            "batlehub_event_loop_lag_worst_seconds",
            "The longest event-loop lag since the process started (worst of the workers).",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.info = Gauge(
            "batlehub_build_info", "Always 1; the version in a label.", ["version"], multiprocess_mode="max", registry=r
        )
        self.deferred = True
        """Request-path counts wait in `_Tally`s for `flush` (False: every count goes to
        prometheus-client at once, what the tally is checked against)."""
        self._tallies: list[_Tally] = []
        self._requests: dict[tuple[str, str, str, str, int], _RequestSeries] = {}

    def series(self, metric: Any, *labels: str) -> Any:
        """A `_Tally` that hands its counts to `metric.labels(*labels)` at `flush`: to be looked up
        once and kept (`labels()` costs more than counting)."""
        child = metric.labels(*labels)
        if not self.deferred:
            return child
        tally: _Tally = _Observations(child) if metric._type == "histogram" else _Count(child)
        self._tallies.append(tally)
        return tally

    def request_series(self, registry: str, fmt: str, route: str, method: str, status: int) -> _RequestSeries:
        """What counts one kind of request (`record`), looked up once per kind."""
        key = (registry, fmt, route, method, status)
        found = self._requests.get(key)
        if found is None:
            found = self._requests[key] = _RequestSeries(
                self.series(self.requests, registry, fmt, route, method, str(status)),
                self.series(self.request_seconds, registry, fmt, route, method),
                self.series(self.response_bytes, registry, fmt, route),
            )
        return found

    def flush(self) -> None:
        """Hand the counts kept in this process to prometheus-client. On the event loop's thread,
        where they are counted (no lock: a tally is never changed while this runs)."""
        for tally in self._tallies:
            tally.flush()


class _Tally:
    """Counts for one prometheus-client series, kept in plain attributes until `flush`: a
    prometheus-client call checks, locks and, for a histogram, walks the buckets every time, which
    was 2-3 % of a cached packument request's CPU (py-spy); adding to an int costs a tenth of it."""

    __slots__ = ("child",)

    def __init__(self, child: Any) -> None:
        self.child = child

    def flush(self) -> None:
        raise NotImplementedError


class _Count(_Tally):
    __slots__ = ("pending",)

    def __init__(self, child: Any) -> None:
        super().__init__(child)
        self.pending: float = 0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0
            self.child.inc(amount)


class _Observations(_Tally):
    """A histogram's observations: their sum and how many fell in each bucket (prometheus-client
    keeps per-bucket counts too and adds them up when it is read, so handing them over is exact)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, child: Any) -> None:
        super().__init__(child)
        self.bounds: list[float] = list(child._upper_bounds)  # ends with +Inf
        self.sum = 0.0
        self.counts = [0] * len(self.bounds)

    def observe(self, amount: float) -> None:
        self.sum += amount
        # The first bound >= amount, as prometheus-client's own `observe` picks it.
        self.counts[bisect_left(self.bounds, amount)] += 1

    def flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        total, self.sum = self.sum, 0.0
        self.child._sum.inc(total)
        buckets = self.child._buckets
        for i, n in enumerate(counts):
            if n:
                counts[i] = 0
                buckets[i].inc(n)


class _RequestSeries:
    """The request counter, latency histogram and bytes counter of one kind of request."""

    __slots__ = ("latency", "requests", "sent")

    def __init__(self, requests: Any, latency: Any, sent: Any) -> None:
        self.requests, self.latency, self.sent = requests, latency, sent

    def record(self, seconds: float, nbytes: int | None) -> None:
        self.requests.inc()
        self.latency.observe(seconds)
        if nbytes:
            self.sent.inc(nbytes)


_current: HubMetrics | None = None


def enable() -> HubMetrics:
    """The process's metrics, made on the first call."""
    global _current
    if _current is None:
        from prometheus_client import disable_created_metrics

        from batlehub import __version__

        # `*_created` series double what a scrape carries and say nothing a dashboard uses (and in
        # multiprocess mode they are not exported at all: one process or several, the same series).
        disable_created_metrics()
        _current = HubMetrics()
        _current.info.labels(__version__).set(1)
    return _current


def current() -> HubMetrics | None:
    """The process's metrics, or None when no app enabled them (then nothing is counted)."""
    return _current


# --- what other code counts ---------------------------------------------------------------------


class Outcomes:
    """One counter's series for a fixed start of its labels, each looked up once: `labels()`
    costs more than counting, and outcomes are counted on request paths.

    `Outcomes(lambda m: m.documents, registry, fmt)("hit")` counts one hit; nothing when
    metrics are off."""

    def __init__(self, pick: Callable[[HubMetrics], Any], *labels: str) -> None:
        self._pick = pick
        self._labels = labels
        self._children: dict[str, Any] = {}

    def __call__(self, last: str) -> None:
        child = self._children.get(last)
        if child is None:
            if _current is None:
                return
            child = self._children[last] = _current.series(self._pick(_current), *self._labels, last)
        child.inc()


def count_policy_decision(registry: str, decision: str, rule: str) -> None:
    """Count one policy decision (for the supply-chain policies).

    `decision` is the outcome ("visible", "hidden", "blocked"), `rule` the name of the rule that
    decided ("min_release_age", "blocklist", ...). Both must come from a small fixed set: never a
    package name, a version or a reason text, which would make a series per package."""
    if _current is not None:
        _current.policy.labels(registry, decision, rule).inc()


def count_reclaimed(source: str, nbytes: int, *, blobs: int = 1, registry: str = "") -> None:
    """Count storage freed by deleting `blobs` blobs of `nbytes` bytes in all. `source` is
    "sweep" (orphans, no registry) or "retention" (with the registry whose cache was trimmed)."""
    if _current is not None:
        _current.reclaimed_bytes.labels(source, registry).inc(nbytes)
        _current.reclaimed_blobs.labels(source, registry).inc(blobs)


def count_publish(registry: str, fmt: str, result: str, nbytes: int = 0) -> None:
    """Count a published version (`result` "published", with its bytes) or a publish that was
    refused ("refused") or failed ("failed")."""
    if _current is not None:
        _current.publishes.labels(registry, fmt, result).inc()
        if nbytes:
            _current.published_bytes.labels(registry, fmt).inc(nbytes)


def count_quota(registry: str, action: str) -> None:
    if _current is not None:
        _current.quota.labels(registry, action).inc()


def count_wait(kind: str, scope: str) -> None:
    """A caller waited for `kind` work ("document", "artifact", "render") that another task of
    this process (`scope` "process") or another replica ("replica") was doing."""
    if _current is not None:
        _current.singleflight_waits.labels(kind, scope).inc()


def count_cache_error(operation: str) -> None:
    if _current is not None:
        _current.cache_errors.labels(operation).inc()


def count_ip_block(decision: str) -> None:
    if _current is not None:
        _current.ip_block.labels(decision).inc()


# --- the process's own state ----------------------------------------------------------------------


def loop_observer(metrics: HubMetrics, in_flight: Callable[[], int]) -> Callable[[float], None]:
    """The `LoopWatch.observe` callback: each lag sample, the worst one so far, and the requests
    in flight (sampled here, so that counting them costs the request path nothing)."""
    lag, worst, flight = metrics.loop_lag, metrics.loop_lag_worst, metrics.in_flight
    highest = 0.0

    def observe(lag_secs: float) -> None:
        nonlocal highest
        lag.observe(lag_secs)
        if lag_secs > highest:
            highest = lag_secs
            worst.set(lag_secs)
        flight.set(in_flight())
        metrics.flush()  # what a reader of the registry other than /metrics sees is 50 ms old at most

    return observe


def record_health(checks: dict[str, str]) -> None:
    """`batlehub_backend_up` from the health checks' answers ("ok" or an error)."""
    if _current is not None:
        for backend, answer in checks.items():
            _current.backend_up.labels(backend).set(1 if answer == "ok" else 0)


def health_ctx(check: Callable[[web.Application], Any]) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` that checks the backends every `HEALTH_EVERY_SECS` (`check(app)` returns the
    health checks), so `batlehub_backend_up` is current even where nothing probes /health (which
    records it too)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from batlehub.coordination import in_background  # coordination counts through this module

        async def loop() -> None:
            while True:
                await asyncio.sleep(HEALTH_EVERY_SECS)
                try:
                    record_health(await check(app))
                except Exception as exc:  # never let the metrics task die
                    log.debug("backend health check for metrics failed: %s", exc)

        async with in_background(loop, "batlehub-metrics-health"):
            yield

    return ctx


# --- exposition -----------------------------------------------------------------------------------


def exposition() -> bytes:
    """The scrape: this process's metrics, or every worker's added up in multiprocess mode."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = os.environ.get(MULTIPROCESS_ENV)
    if folder:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)
    observed = enable()
    observed.flush()
    return generate_latest(observed.registry)


async def serve_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`, guarded by `[metrics] require_token` (an admin token or role "metrics")."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from batlehub import appkeys
    from batlehub.errors import Forbidden, Unauthorized
    from batlehub.requests import identity

    settings = request.config_dict.get(appkeys.SETTINGS)
    if settings is not None and settings.metrics.require_token:  # the [metrics] port app has no settings
        caller = identity(request)
        if caller.anonymous:
            raise Unauthorized(
                "metrics need a token with role admin or metrics",
                headers={"WWW-Authenticate": 'Bearer realm="batlehub"'},
            )
        if caller.role not in ("admin", "metrics"):
            raise Forbidden("metrics need a token with role admin or metrics")
    # Reading every worker's files is disk I/O: off the event loop.
    body = await asyncio.to_thread(exposition) if os.environ.get(MULTIPROCESS_ENV) else exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_only_app() -> web.Application:
    """The application behind `[metrics] port`: /metrics and nothing else, without auth."""
    app = web.Application()
    app.router.add_get(PATH, serve_metrics)
    return app


# --- several workers ----------------------------------------------------------------------------


def prepare_worker_folder() -> Path:
    """A fresh folder for the workers' metric files, named in `PROMETHEUS_MULTIPROC_DIR` for the
    workers this process starts next. Folders left by earlier runs whose parent process is gone
    (killed before it could clean up) are deleted first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{FOLDER_PREFIX}*"):
        pid = old.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base))
    os.environ[MULTIPROCESS_ENV] = str(folder)
    return folder


def remove_worker_folder(folder: Path) -> None:
    os.environ.pop(MULTIPROCESS_ENV, None)
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def uses_workers(settings: Settings) -> bool:
    return settings.metrics.enabled and settings.server.workers > 1
