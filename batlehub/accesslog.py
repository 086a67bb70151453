"""The access log: one line per request (method, path, status, time, user, client IP, and the trace
id when the request was traced).

`LoggingAccessLog` goes through the `batlehub.access` logger (the default, and what tests and
embedders see). The server uses `StreamAccessLog`, which formats the line itself and writes the
lines of one event-loop turn with one system call: through `logging`, the line cost about 10 µs,
measurable on the packument path; this way it costs about one.

With `--log-format json` (`BATLEHUB_LOG_FORMAT=json`) every line, access lines and the other log
records alike, is one JSON object (`JsonFormatter`, `StreamAccessLog(json_lines=True)`), which log
shippers read without a parsing rule.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol, TextIO

logger = logging.getLogger("batlehub.access")

LOG_FORMATS = ("text", "json")


class AccessLog(Protocol):
    def write(
        self,
        method: str,
        path: str,
        status: int,
        elapsed_ms: float,
        user: str | None,
        ip: str,
        trace_id: str | None = None,
    ) -> None:
        """Record one finished request (`trace_id`: 32 hex digits when it was traced)."""

    def flush(self) -> None:
        """Write out anything buffered."""


def _line(
    method: str, path: str, status: int, elapsed_ms: float, user: str | None, ip: str, trace_id: str | None
) -> str:
    line = f"{method} {path} {status} {elapsed_ms:.1f}ms user={user or '-'} ip={ip}"
    return f"{line} trace={trace_id}" if trace_id else line


def _fields(
    method: str, path: str, status: int, elapsed_ms: float, user: str | None, ip: str, trace_id: str | None
) -> dict[str, Any]:
    """The access line's fields under the names a JSON line gives them."""
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(elapsed_ms, 1),
        "user": user,
        "ip": ip,
    }
    if trace_id:
        fields["trace_id"] = trace_id
    return fields


class LoggingAccessLog:
    def write(
        self,
        method: str,
        path: str,
        status: int,
        elapsed_ms: float,
        user: str | None,
        ip: str,
        trace_id: str | None = None,
    ) -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info(
                "%s",
                _line(method, path, status, elapsed_ms, user, ip, trace_id),
                extra={"access": _fields(method, path, status, elapsed_ms, user, ip, trace_id)},
            )

    def flush(self) -> None:
        pass


class _Clock:
    """The log's timestamp, formatted once a second rather than once a request."""

    def __init__(self, layout: str, separator: str, zone: bool) -> None:
        self.layout = layout
        self.separator = separator
        self.zone = zone
        self._second = -1
        self._stamp = ""
        self._zone = ""

    def __call__(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            local = time.localtime(second)
            self._stamp = time.strftime(self.layout, local)
            self._zone = time.strftime("%z", local) if self.zone else ""
        return f"{self._stamp}{self.separator}{int((now - second) * 1000):03d}{self._zone}"


class StreamAccessLog:
    """Lines in the same layout as the server's other log lines, batched per event-loop turn."""

    def __init__(self, stream: TextIO, *, json_lines: bool = False) -> None:
        self.stream = stream
        self.json_lines = json_lines
        self._pending: list[str] = []
        self._scheduled = False
        if json_lines:
            self._clock = _Clock("%Y-%m-%dT%H:%M:%S", ".", zone=True)
        else:
            self._clock = _Clock("%Y-%m-%d %H:%M:%S", ",", zone=False)

    def write(
        self,
        method: str,
        path: str,
        status: int,
        elapsed_ms: float,
        user: str | None,
        ip: str,
        trace_id: str | None = None,
    ) -> None:
        if self.json_lines:
            record = {
                "time": self._clock(),
                "level": "INFO",
                "logger": "batlehub.access",
                **_fields(method, path, status, elapsed_ms, user, ip, trace_id),
            }
            self._pending.append(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            line = _line(method, path, status, elapsed_ms, user, ip, trace_id)
            self._pending.append(f"{self._clock()} INFO batlehub.access: {line}\n")
        if len(self._pending) >= 512:
            self.flush()
        elif not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (shutdown): write at once
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or full: never fail a request over a log line
            pass


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message, the trace id of the span it
    was logged in (when tracing), the traceback if any, and an access line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        from batlehub import tracing

        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}"
            + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        else:
            out["message"] = record.getMessage()
            trace_id = tracing.trace_id()
            if trace_id:
                out["trace_id"] = trace_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)
