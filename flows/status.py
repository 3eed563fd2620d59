"""What a running edge is doing, as one JSON-able dict: the console, ``/status`` and ``/``.

:func:`edge_status` reads what the flow already keeps: each part's
:class:`~flows.accounting.Meter` (through :func:`~flows.accounting.report`, so
the numbers are those of the reduction report), the ingest process's stats
snapshot (:mod:`flows.ingest_stats`: journal depth), the cloud link's outbox
and sender, and the last :data:`RECENT_ALARMS` alarm rows the flow wrote. It
reads no journal or output file itself, so it is cheap enough to call every
second.

:class:`StatusServer` serves it on ``metrics_listen`` beside ``/metrics``:
``GET /`` an HTML page that refreshes itself from ``GET /status`` (the dict as
JSON) every 2 s. Read-only: other paths are 404, other methods 405.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from flows.accounting import RECEIVED, ratio_text, report
from flows.ingest_stats import read_snapshot

if TYPE_CHECKING:
    from flows.api import Edge

__all__ = ["RECENT_ALARMS", "StatusServer", "edge_status", "status_line"]

log = logging.getLogger("edgesieve.status")

RECENT_ALARMS = 20
"""How many of the latest alarm rows the status keeps (newest first)."""

FLOW_FIELDS = (
    "messages_in",
    "raw_bytes",
    "rows_out",
    "wire_bytes",
    "ratio",
    "dead_letters",
    "alarms",
)
"""The per-flow numbers of the status, in the order the page and the console show them."""


def _iso(ts: datetime | None) -> str | None:
    return ts.astimezone(UTC).isoformat() if ts is not None else None


def edge_status(edge: Edge) -> dict[str, Any]:
    """The status of ``edge`` (any part of a flow gives the whole flow's) as a JSON-able dict.

    Per flow part: ``messages_in`` and ``raw_bytes`` (device messages and bytes
    received), ``rows_out`` (rows that reached the part's outputs, dead letters
    not counted), ``wire_bytes`` (sealed for the cloud), ``ratio`` (raw bytes
    per local output byte, None before a file was written: the report's
    ``ratio``), ``dead_letters`` and ``alarms`` (rows of those outputs).
    """
    shared = edge._shared  # noqa: SLF001 - the flow's shared runtime
    now = datetime.now(UTC)
    started = shared.started_at
    flows: dict[str, dict[str, Any]] = {}
    devices: set[str] = set()
    owners = {id(part) for part in shared.owners.values()}
    for part in shared.parts:
        rep = report(part.meter)
        devices.update(d for d, stages in rep.devices.items() if RECEIVED in stages)
        shown = id(part) in owners or not rep.idle or (not owners and part is shared.parts[0])
        if not shown:
            continue
        outputs = part._outputs  # noqa: SLF001 - the part's declared outputs
        flows[part.name] = {
            "messages_in": rep.messages_in,
            "raw_bytes": rep.raw_bytes,
            "rows_out": sum(rep.stages.get(name, 0) for name in outputs if name != "dead_letters"),
            "wire_bytes": sum(rep.wire_bytes.values()),
            "ratio": rep.ratio,
            "dead_letters": rep.stages.get("dead_letters", 0),
            "alarms": sum(
                rep.stages.get(name, 0) for name, out in outputs.items() if out.model == "alarms"
            ),
        }
    journal = {"messages": 0, "bytes": 0, "oldest_age_s": 0.0, "unread": 0}
    ingest = shared.ingest
    snap = read_snapshot(ingest.source.root) if ingest is not None else None
    if snap is not None:
        held = snap["journal"]
        journal = {
            "messages": int(held["messages"]),
            "bytes": int(held["bytes"]),
            "oldest_age_s": float(held["oldest_age_s"]),
            "unread": ingest.source.lag,
        }
    link = shared.link
    outbox, cloud = (
        {"batches": 0, "bytes": 0},
        {
            "configured": link is not None,
            "connected": False,
            "acked_batches": 0,
        },
    )
    if link is not None:
        depth = link.status()
        if depth is not None:
            outbox = {"batches": depth.batches, "bytes": depth.bytes}
            cloud["connected"] = depth.connected
            cloud["acked_batches"] = depth.acked
    return {
        "edge_id": edge.config.edge_id,
        "started_at": _iso(started),
        "uptime_s": (now - started).total_seconds() if started is not None else 0.0,
        "state": edge.state,
        "flows": flows,
        "devices_seen": len(devices),
        "journal": journal,
        "outbox": outbox,
        "cloud": cloud,
        "recent_alarms": [_alarm(row) for row in reversed(shared.alarms)],
    }


def _alarm(row: Any) -> dict[str, Any]:
    """An alarm row (an ``Alarm``, or a dict from a flow file's step) in the status's shape."""
    get = (
        row.get if isinstance(row, dict) else lambda name, default=None: getattr(row, name, default)
    )
    ts = get("ts")
    value = get("value")
    return {
        "device": str(get("device", "")),
        "key": str(get("key", "") or ""),
        "rule": str(get("rule", "")),
        "state": str(get("state", "")),
        "severity": str(get("severity", "")),
        "ts": _iso(ts) if isinstance(ts, datetime) else ts,
        "value": float(value) if isinstance(value, int | float) else None,
    }


def _count(n: int) -> str:
    return f"{n:,}"


def status_line(status: dict[str, Any], *, left_s: float | None = None) -> str:
    """The status as one line (what the console prints without a terminal)."""
    parts = [f"status: {status['state']}, up {status['uptime_s']:.0f}s"]
    if left_s is not None:
        parts[0] += f", {left_s:.0f}s left"
    for name, f in status["flows"].items():
        ratio = ratio_text(f["ratio"]) if f["ratio"] is not None else "n/a"
        parts.append(
            f"{name} {_count(f['messages_in'])} in, {_count(f['rows_out'])} rows out, "
            f"ratio {ratio}, {f['alarms']} alarms, {f['dead_letters']} dead letters"
        )
    journal, outbox, cloud = status["journal"], status["outbox"], status["cloud"]
    tail = f"{status['devices_seen']} devices, journal {_count(journal['messages'])} messages"
    if cloud["configured"]:
        state = "connected" if cloud["connected"] else "disconnected"
        tail += f", outbox {_count(outbox['batches'])} batches, cloud {state}"
    parts.append(tail)
    return "; ".join(parts)


PAGE = files("flows").joinpath("status.html").read_bytes()
"""The status page: one HTML file, script and style inline, no external resources."""


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edgesieve"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - the http.server protocol
        path = self.path.split("?", 1)[0]
        if path == "/":
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE)
        elif path == "/status":
            body = json.dumps(self.server.status()).encode()
            self._send(HTTPStatus.OK, "application/json", body)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
        else:
            text = f"{path}: not found; hint: / (status page), /status (JSON), /metrics\n"
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", text.encode())

    def _refuse(self) -> None:
        text = f"{self.command} {self.path}: read-only, only GET is allowed\n"
        self._send(
            HTTPStatus.METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            text.encode(),
            allow="GET",
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815
    do_HEAD = _refuse  # noqa: N815

    def _send(self, status: HTTPStatus, kind: str, body: bytes, allow: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if allow is not None:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self.registry = registry
        self.status = status
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class StatusServer:
    """``/``, ``/status`` and ``/metrics`` on one address, served by a thread of their own."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._server = _Server((host, port), registry, status)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="edgesieve-status",
            daemon=True,
        )

    @property
    def port(self) -> int:
        """The port served (the one the OS picked for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        """Start serving; return self."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5.0)
        self._server.server_close()
