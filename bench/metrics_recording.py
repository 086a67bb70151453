"""What counting one request costs, in process: the metrics part of a cached packument request.

    .venv/bin/python bench/metrics_recording.py [--number N] [--repeat R] [--workers-mode]

Times what the hub does per request when `[metrics] enabled = true`: the access-log middleware's
`_count` (request counter, latency histogram, response bytes) on a request that a registry format
named "packument", plus one document-cache hit (`Outcomes`), the four things py-spy shows on the
request path (bench/observability.py `--profile`). Reported: microseconds per request (best of
`--repeat` runs of `--number` requests, timeit). Afterwards it checks that a scrape shows exactly
the requests it recorded, so that a fast path that loses counts cannot pass for a fast one.

`--workers-mode` measures prometheus-client's multiprocess mode (the values in memory-mapped files,
as with `server.workers > 1`) in a scratch folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import timeit
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=100_000, help="requests per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the best one is reported")
    parser.add_argument("--workers-mode", action="store_true", help="prometheus-client's multiprocess mode")
    args = parser.parse_args()
    if args.workers_mode:
        # Before prometheus-client is imported: it picks its value class then.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="batlehub-metrics-bench-")

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from batlehub import appkeys, metrics
    from batlehub.middleware import _count
    from batlehub.requests import label_route

    observed = metrics.enable()
    registry_app = web.Application()
    registry_app[appkeys.REGISTRY_SETTINGS] = SimpleNamespace(name="npm", type="npm")  # type: ignore[misc]
    request = make_mocked_request("GET", "/registries/npm/some-package")
    request.match_info.add_app(registry_app)
    label_route(request, "packument")
    response = web.Response(body=b"x" * 21_000)
    lookups = metrics.Outcomes(lambda m: m.documents, "npm", "npm")

    def one_request() -> None:
        _count(observed, request, 200, 0.0042, response)
        lookups("hit")

    timer = timeit.Timer(one_request)
    best = min(timer.repeat(repeat=args.repeat, number=args.number))
    recorded = args.number * args.repeat
    scraped = metrics.exposition().decode()

    def value(name: str, *labels: str) -> float:
        for line in scraped.splitlines():
            if line.startswith(name + "{") and all(label in line for label in labels):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    counted = value("batlehub_http_requests_total", 'route="packument"', 'status="200"')
    hits = value("batlehub_document_cache_lookups_total", 'result="hit"')
    sent = value("batlehub_http_response_bytes_total", 'route="packument"')
    observed_count = value("batlehub_http_request_duration_seconds_count", 'route="packument"')
    in_bucket = value("batlehub_http_request_duration_seconds_bucket", 'route="packument"', 'le="0.005"')
    exact = counted == hits == observed_count == in_bucket == recorded and sent == recorded * 21_000
    mode = "multiprocess (workers > 1)" if args.workers_mode else "one process"
    print(f"{mode}: {best / args.number * 1e6:.2f} µs per request (best of {args.repeat} runs of {args.number})")
    print(
        f"scrape: {counted:.0f} requests, {hits:.0f} hits, {sent:.0f} bytes for {recorded} recorded: "
        + ("exact" if exact else "NOT EXACT")
    )
    if args.workers_mode:
        metrics.remove_worker_folder(__import__("pathlib").Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
