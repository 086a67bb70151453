"""Runtime state of one process: shutting down or not, and warnings that health should show."""

from __future__ import annotations

from dataclasses import dataclass, field

from batlehub.coordination import LogThrottle

DENIED_AUDIT_EVERY_SECS = 10.0


@dataclass
class HubState:
    shutting_down: bool = False
    tracing: bool = False
    """Whether requests get OpenTelemetry spans (`[otel] endpoint` is set)."""
    warnings: list[str] = field(default_factory=list)
    """Operator-facing problems found at start (e.g. a per-process cache with several replicas)."""

    denied_audits: LogThrottle = field(default_factory=lambda: LogThrottle(DENIED_AUDIT_EVERY_SECS))
    """Refusals audited per client (address and user): one row per interval, counting the rest."""

    in_flight: int = 0
    """Requests being handled right now (a graceful stop waits for them before closing)."""

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
