"""Runtime state of one process: shutting down or not, and warnings that health should show."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HubState:
    shutting_down: bool = False
    tracing: bool = False
    """Whether requests get OpenTelemetry spans (`[otel] endpoint` is set)."""
    warnings: list[str] = field(default_factory=list)
    """Operator-facing problems found at start (e.g. a per-process cache with several replicas)."""

    in_flight: int = 0
    """Requests being handled right now (a graceful stop waits for them before closing)."""

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
