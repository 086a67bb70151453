"""Where the hub may send requests: the outbound-URL policy for every upstream request.

The hub sends requests only to the configured upstreams (same scheme, host and port), whatever an
upstream's documents or redirects point at: nothing an upstream sends makes the hub reach another
service, nor tells a client whether one exists (see docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from opentelemetry import trace
from yarl import URL

from batlehub import metrics, tracing


def failure_kind(exc: BaseException) -> str:
    """The `reason` label of a failed upstream request."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OutsideUpstreams):
        return "refused"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection"
    return "invalid"


def failure_reason(exc: BaseException) -> str:
    """A short, host-free description of a failed HTTP exchange, for clients."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OutsideUpstreams):
        return "it points outside the configured upstreams"
    if isinstance(exc, aiohttp.ClientConnectionError):
        return "connection failed"
    return "bad response"


MAX_REDIRECTS = 3


class UpstreamOrigins:
    """The origins (scheme, host, port) of a registry's upstreams, and requests limited to them.

    Every upstream request goes through `request`, which is therefore where they are counted
    (`batlehub_upstream_*`, labelled by `registry` and origin, never a full URL) and traced (a
    client span, whose `traceparent` the upstream receives)."""

    def __init__(self, urls: list[str] | tuple[str, ...] = (), *, registry: str = "") -> None:
        self._origins: set[tuple[str, str, int]] = set()
        self.registry = registry
        self.add(urls)

    def add(self, urls: list[str] | tuple[str, ...]) -> None:
        for url in urls:
            found = _origin(URL(url))
            if found is not None:
                self._origins.add(found)

    def allows(self, url: URL) -> bool:
        return _origin(url) in self._origins

    @asynccontextmanager
    async def request(
        self, session: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """`session.request`, refusing URLs outside the policy, and following at most
        `MAX_REDIRECTS` redirects, each of them inside it too. Raises `OutsideUpstreams` for
        a URL (or a redirect) that leaves the configured upstreams."""
        target = url if isinstance(url, URL) else URL(url)
        for _ in range(MAX_REDIRECTS + 1):
            if not self.allows(target):
                self._count_refusal(target)
                raise OutsideUpstreams(str(target))
            span = None
            if tracing.active:
                span = tracing.tracer.start_span(
                    f"{method} {origin_of(str(target))}",
                    kind=trace.SpanKind.CLIENT,
                    attributes={"http.request.method": method, "url.full": tracing.safe_url(target)},
                )
                headers = dict(kwargs.get("headers") or {})
                with trace.use_span(span):
                    tracing.inject(headers)  # the upstream continues this trace
                kwargs["headers"] = headers
            started = time.perf_counter()
            answered = False
            try:
                async with session.request(method, target, allow_redirects=False, **kwargs) as response:
                    answered = True
                    self._count(target, started, str(response.status), "status" if response.status >= 500 else None)
                    if span is not None:
                        span.set_attribute("http.response.status_code", response.status)
                    location = response.headers.get("Location")
                    if response.status not in (301, 302, 303, 307, 308) or not location:
                        yield response
                        return
                    target = target.join(URL(location))
                    if response.status == 303:
                        method = "GET"
            except (aiohttp.ClientError, TimeoutError) as exc:
                # No answer at all, or the body broke off after the headers (already counted).
                self._count(target, None if answered else started, "error", failure_kind(exc))
                if span is not None:
                    span.record_exception(exc)
                    span.set_status(trace.StatusCode.ERROR, failure_reason(exc))
                raise
            finally:
                if span is not None:
                    span.end()
        raise OutsideUpstreams(f"{target} (more than {MAX_REDIRECTS} redirects)")

    def _count(self, target: URL, started: float | None, status: str, error: str | None) -> None:
        """One exchange (`started` None: only its `error`, the exchange was counted already)."""
        observed = metrics.current()
        if observed is None:
            return
        origin = origin_of(str(target))
        if started is not None:
            observed.upstream_requests.labels(self.registry, origin, status).inc()
            observed.upstream_seconds.labels(self.registry, origin).observe(time.perf_counter() - started)
        if error is not None:
            observed.upstream_errors.labels(self.registry, origin, error).inc()

    def _count_refusal(self, target: URL) -> None:
        observed = metrics.current()
        if observed is not None:
            observed.upstream_errors.labels(self.registry, origin_of(str(target)), "refused").inc()


class OutsideUpstreams(aiohttp.ClientError):
    """A URL outside the configured upstreams; never requested."""


def origin_of(url: str) -> str:
    """`scheme://host:port` of a configured upstream: how it is named to clients (no path, no
    credentials)."""
    parsed = URL(url)
    port = f":{parsed.explicit_port}" if parsed.explicit_port else ""
    return f"{parsed.scheme}://{parsed.host}{port}"


def _origin(url: URL) -> tuple[str, str, int] | None:
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return url.scheme, url.host.lower(), url.port or (443 if url.scheme == "https" else 80)
