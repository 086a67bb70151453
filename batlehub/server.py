"""The HTTP server around the application: how connections are accepted and timed out.

- `keepalive_timeout` is `limits.header_timeout_secs`: aiohttp's keep-alive timer runs from the
  moment a connection opens until its first request's headers are in, so a connection that sends
  nothing, or half its headers, is closed; so is a keep-alive connection left idle that long.
  Request bodies have their own idle timeout (`batlehub.requests.body_reader`).
- Errors the HTTP parser finds before any handler runs (a malformed request line, headers too
  long, an unknown method) are answered in JSON like every other error, without echoing the
  request back.
- The process may open as many files as its hard limit allows: every connection is one, and the
  common default of 1,024 is what a few hundred slow clients used to exhaust.
"""

from __future__ import annotations

import json
import logging
import resource
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from batlehub.config import Settings
from batlehub.coordination import LogThrottle

log = logging.getLogger("batlehub.server")
_parser_errors = LogThrottle()


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response started already: nothing more to say
            raise ConnectionError("the response was sent already; cannot send the error")
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        elif _parser_errors():  # anyone can send garbage: one line a minute, not a line each
            log.info("refused a malformed HTTP request from %s (%s): %s", request.remote, status, exc)
        try:
            phrase = HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = "error"
        text = f"malformed HTTP request: {phrase}" if 400 <= status < 500 else "internal server error"
        response = web.Response(
            status=status,
            body=json.dumps({"error": text}).encode(),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff"},
        )
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class HubRunner(web.AppRunner):
    """`web.AppRunner` whose server answers parser errors in JSON (see the module docstring)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server itself and offers no hook for its protocol class.
        server.__class__ = _JsonErrorServer
        return server


def make_runner(app: web.Application, settings: Settings) -> HubRunner:
    # The drain in cli waits up to half of shutdown_timeout_secs for requests in flight; aiohttp
    # then waits up to shutdown_timeout for stragglers, and as long again for the ones it
    # cancelled: a quarter each keeps the whole drain within shutdown_timeout_secs.
    return HubRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_secs / 4,
        keepalive_timeout=settings.limits.header_timeout_secs,
    )


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (each connection is one file)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:  # a container may forbid it: then the soft limit stays
        log.info("could not raise the open-file limit: %s", exc)
