"""Counts kept in plain attributes until a flush (one process) scrape exactly as prometheus-client's
own calls would have counted them: same series, same bucket for a value on a bound, same sums."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest

from batlehub import metrics
from batlehub.metrics import LATENCY_BUCKETS, HubMetrics

SECONDS = [0.0, 0.0004, *LATENCY_BUCKETS, 0.0031, 0.3, 29.9, 30.0, 31.0, 1e6]
"""Every bound itself (prometheus-client counts a value on a bound in that bucket), values between,
and values over the last bound (+Inf)."""


def record(observed: HubMetrics) -> None:
    for i, seconds in enumerate(SECONDS):
        status = 200 if i % 3 else 404
        observed.request_series("npm", "npm", "packument", "GET", status).record(seconds, 1000 + i if i % 4 else None)
        observed.series(observed.documents, "npm", "npm", "hit" if i % 2 else "miss").inc()
    observed.request_series("", "", "/api/v1/banner", "HEAD", 200).record(0.002, None)


def test_a_flush_scrapes_what_direct_counting_would() -> None:
    disable_created_metrics()  # as `metrics.enable` does: creation times would differ
    direct, kept = HubMetrics(CollectorRegistry()), HubMetrics(CollectorRegistry())
    direct.deferred = False
    assert kept.deferred
    record(direct)
    record(kept)
    expected = generate_latest(direct.registry)
    assert b'le="0.005"' in expected and b"batlehub_document_cache_lookups_total" in expected
    # Before a flush the series exist with nothing counted; after one, everything, byte for byte.
    assert b'route="packument",status="200"} 0.0' in generate_latest(kept.registry)
    kept.flush()
    assert generate_latest(kept.registry) == expected
    # A second round adds up; a flush with nothing new changes nothing.
    record(direct)
    record(kept)
    kept.flush()
    kept.flush()
    assert _same_but_sums(generate_latest(kept.registry), generate_latest(direct.registry))


def _same_but_sums(a: bytes, b: bytes) -> bool:
    """Equal, sums within float rounding (added in another order after the first flush)."""
    lines_a, lines_b = a.decode().splitlines(), b.decode().splitlines()
    if len(lines_a) != len(lines_b):
        return False
    for x, y in zip(lines_a, lines_b, strict=True):
        if x != y:
            (name_x, value_x), (name_y, value_y) = x.rsplit(" ", 1), y.rsplit(" ", 1)
            if name_x != name_y or "_sum" not in name_x or abs(float(value_x) - float(value_y)) > 1e-9:
                return False
    return True


def test_the_loop_watch_tick_flushes() -> None:
    kept = HubMetrics(CollectorRegistry())
    kept.request_series("npm", "npm", "packument", "GET", 200).record(0.01, 5)
    metrics.loop_observer(kept, lambda: 0)(0.001)
    scraped = generate_latest(kept.registry).decode()
    assert (
        'batlehub_http_requests_total{format="npm",method="GET",registry="npm",route="packument",status="200"} 1.0'
        in scraped
    )
    assert 'batlehub_http_response_bytes_total{format="npm",registry="npm",route="packument"} 5.0' in scraped
