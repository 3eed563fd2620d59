"""The standard logs flow.

Device log lines → decode → the logs step (:func:`operators.logs.logs`): lines
at or above ``logs.level`` → ``log_events``; every line counted per device,
event-time window and message template → ``log_summary``; undecodable lines
and late lines below the level → ``dead_letters``.

Run it with ``edgesieve run flows.logs --config edge.yaml`` or with
``EDGESIEVE_CONFIG=edge.yaml python -m bytewax.run flows.logs``;
:mod:`flows.edge` runs it beside the telemetry and vibration flows.
"""

from __future__ import annotations

from datetime import timedelta

import bytewax.operators as op

from connectors.codecs.logs import logs_payload
from flows.api import Devices, Edge
from flows.runtime import lazy_flow
from operators.logs import logs
from operators.records import LOGS, DeadLetter, LogLine

__all__ = ["build", "late_letter", "pipeline"]


def late_letter(line: LogLine, allowed_lateness: timedelta) -> DeadLetter:
    """Describe a log line older than its device's newest one by more than the allowed lateness."""
    reason = (
        f"late: {line.level} log line at {line.ts.isoformat()} is older than the newest line of "
        f"its device by more than the allowed lateness ({allowed_lateness.total_seconds():g}s), "
        "so log_summary does not count it; raise logs.allowed_lateness or fix the device clock"
    )
    return DeadLetter(line.device, line.transport, line.ts, reason, logs_payload(line))


def pipeline(edge: Edge, dev: Devices) -> None:
    """The logs step and its outputs, on any device input."""
    settings = edge.config.logs
    out = logs(
        edge.id("logs"),
        dev.logs,
        level=settings.level,
        window=settings.window,
        max_templates=settings.max_templates,
        allowed_lateness=settings.allowed_lateness,
    )
    lateness = settings.allowed_lateness
    edge.output("log_events", out.events)
    edge.output("log_summary", out.summary)
    edge.dead_letters(op.map(edge.id("late"), out.late, lambda kv: late_letter(kv[1], lateness)))


def build(edge: Edge) -> None:
    """The logs flow: device logs in; events, template summaries and dead letters out."""
    pipeline(edge, edge.devices("in", channels=[LOGS]))


__getattr__ = lazy_flow(__name__, build)
