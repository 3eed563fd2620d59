"""Ingest statistics: the ingest process's counters, handed to the flow process through a file.

The ingest process (:mod:`flows.ingest_process`) owns the journal, the MQTT
client and the HTTP/CoAP servers, so their counters live there; the flow
process owns ``/metrics`` and the report. :class:`StatsWriter` (in the ingest
process) writes a small JSON snapshot, ``data_dir/journal/ingest-stats.json``,
every :data:`INTERVAL_S` and once more when ingest stops, by write-then-rename,
so a reader sees the old snapshot or the new one, whole. The flow process reads
it when scraped or reporting (:func:`read_snapshot`); a snapshot older than
:data:`STALE_AFTER_S` is marked stale (the ingest process is down or stuck).

A file rather than a pipe to the supervisor: no extra thread or queue in the
flow process, the snapshot survives a restart of either side, and the
standalone ingest process (``python -m flows.ingest_process``) writes it too.

Counters add up over the ingest processes of one run: a new ingest process
starts from the counters of the snapshot its predecessor left (the supervisor
removes the file when a run starts). A process killed with ``kill -9`` loses
what it counted since its last snapshot (at most :data:`INTERVAL_S`).

``commit_seconds`` is a histogram of the journal's group commit latencies
(:class:`MeteredJournal`): one observation per group commit.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from connectors.devices.ingress import Ingress
from connectors.devices.journal import Journal
from connectors.devices.mqtt.journaled import JournaledMqtt
from connectors.devices.mqtt_server import MqttServer

__all__ = [
    "COMMIT_BUCKETS",
    "COUNTERS",
    "STATS_FILE",
    "CommitHistogram",
    "MeteredJournal",
    "StatsWriter",
    "read_snapshot",
    "remove_snapshot",
]

logger = logging.getLogger("edgesieve.ingest")

STATS_FILE: Final = "ingest-stats.json"
"""Name of the snapshot under the journal's directory."""
INTERVAL_S: Final = 1.0
"""How often the ingest process writes the snapshot."""
SAMPLE_S: Final = 0.25
"""How often the group commit latencies are folded into the histogram."""
STALE_AFTER_S: Final = 5.0
"""A snapshot older than this is stale: the ingest process is not running (or not writing)."""
COMMIT_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
"""Upper bounds (seconds) of the commit latency histogram's buckets (+Inf is implied)."""
COUNTERS: Final = (
    "commits",
    "duplicates",
    "journal_refused",
    "refused",
    "mqtt_committed",
    "mqtt_acked",
    "mqtt_withheld",
    "mqtt_dropped",
    "mqtt_server_refused_connections",
    "mqtt_server_keepalive_timeouts",
    "refused_share",
    "over_share",
    "client_aborted",
)
"""Snapshot counters that add up over the ingest processes of a run."""


class CommitHistogram:
    """Bucket counts and sum of commit latencies (seconds); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(COMMIT_BUCKETS) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one latency."""
        index = bisect.bisect_left(COMMIT_BUCKETS, seconds)
        with self._lock:
            self._counts[index] += 1
            self._sum += seconds

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's (non-cumulative) bucket counts and sum."""
        if len(counts) != len(self._counts):
            return  # another bucket layout: not comparable, start afresh
        with self._lock:
            for i, n in enumerate(counts):
                self._counts[i] += int(n)
            self._sum += float(total)

    def state(self) -> tuple[list[int], float]:
        """Per-bucket (non-cumulative) counts, the last one for +Inf, and the sum."""
        with self._lock:
            return list(self._counts), self._sum


class MeteredJournal(Journal):
    """A :class:`Journal` whose group commit latencies are kept in :attr:`commit_seconds`.

    Each group commit is timed by the journal itself (submission to durable
    commit of the group's first message, the longest wait in the group: the
    figure behind ``JournalStats.commit_p50_ms``); :meth:`sample_commits` folds
    the groups committed since its last call into the histogram, so timing
    costs nothing per message. It reads the journal's last
    ``LATENCY_SAMPLES`` group waits, so it must run more often than that many
    groups commit (the stats thread calls it every :data:`SAMPLE_S`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_seconds = CommitHistogram()
        self._sampled = 0

    def sample_commits(self) -> None:
        """Add the waits of the groups committed since the last call to :attr:`commit_seconds`."""
        with self._lock:
            commits = self._commits
            new = min(commits - self._sampled, len(self._waits))
            waits = list(itertools.islice(reversed(self._waits), new))
            self._sampled = commits
        for wait in waits:
            self.commit_seconds.observe(wait)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def read_snapshot(root: Path) -> dict[str, Any] | None:
    """The snapshot under the journal directory ``root``; None if there is none.

    Adds ``age_s`` (seconds since it was written) and ``up``: the ingest process
    is running and wrote it within :data:`STALE_AFTER_S` (false: stale or stopped).

    An unreadable or malformed snapshot (a foreign file) is None too, logged once per call.
    """
    path = Path(root) / STATS_FILE
    try:
        snap = json.loads(path.read_text(encoding="utf-8"))
        written = datetime.fromisoformat(snap["written_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning(
            "ingest stats: cannot read %s (%s: %s); hint: it is rewritten every %gs by the "
            "ingest process, remove it if it is not that process's file",
            path,
            type(exc).__name__,
            exc,
            INTERVAL_S,
        )
        return None
    snap["age_s"] = max(0.0, (datetime.now(UTC) - written).total_seconds())
    snap["up"] = bool(snap.get("running")) and snap["age_s"] <= STALE_AFTER_S
    return snap


def remove_snapshot(root: Path) -> None:
    """Remove the snapshot (and temporary files a killed writer left), so a run starts at zero."""
    for path in [Path(root) / STATS_FILE, *Path(root).glob(f".{STATS_FILE}.*.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class StatsWriter:
    """Writes the ingest process's snapshot every :data:`INTERVAL_S` (see the module doc)."""

    def __init__(
        self,
        journal: MeteredJournal,
        ingress: Ingress | None = None,
        mqtt: JournaledMqtt | None = None,
        mqtt_server: MqttServer | None = None,
    ) -> None:
        self.journal = journal
        self.ingress = ingress
        self.mqtt = mqtt
        self.mqtt_server = mqtt_server
        self.path = journal.root / STATS_FILE
        self._started_at = _now()
        self._carried: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        earlier = read_snapshot(journal.root)
        if earlier is not None:  # the previous ingest process of this run
            for name in COUNTERS:
                self._carried[name] = int(earlier.get(name, 0))
            hist = earlier.get("commit_seconds") or {}
            journal.commit_seconds.add(list(hist.get("counts", [])), hist.get("sum", 0.0))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="edgesieve-ingest-stats", daemon=True
        )

    def snapshot(self, *, running: bool = True) -> dict[str, Any]:
        """The snapshot as written: journal state, counters, the commit histogram."""
        stats = self.journal.stats()
        mqtt, ingress, server = self.mqtt, self.ingress, self.mqtt_server
        now = {
            "commits": stats.commits,
            "duplicates": stats.duplicates,
            "journal_refused": stats.refused,
            "refused": ingress.refused if ingress is not None else 0,
            "mqtt_committed": mqtt.committed if mqtt is not None else 0,
            "mqtt_acked": mqtt.acked if mqtt is not None else 0,
            "mqtt_withheld": mqtt.withheld if mqtt is not None else 0,
            "mqtt_dropped": mqtt.dropped if mqtt is not None else 0,
            "mqtt_server_refused_connections": server.refused_connections if server else 0,
            "mqtt_server_keepalive_timeouts": server.keepalive_timeouts if server else 0,
            "refused_share": stats.refused_share,
            "over_share": stats.over_share,
            "client_aborted": ingress.aborted if ingress is not None else 0,
        }
        self.journal.sample_commits()
        counts, total = self.journal.commit_seconds.state()
        return {
            "pid": os.getpid(),
            "started_at": self._started_at,
            "written_at": _now(),
            "running": running,
            "journal": asdict(stats),
            **{name: self._carried[name] + now[name] for name in COUNTERS},
            "mqtt_withheld_now": mqtt.withheld_now if mqtt is not None else 0,
            "mqtt_server_connections": server.connections if server is not None else 0,
            "commit_seconds": {"buckets": list(COMMIT_BUCKETS), "counts": counts, "sum": total},
        }

    def write(self, *, running: bool = True) -> None:
        """Write the snapshot now (write-then-rename; nothing is left behind on failure)."""
        tmp = self.path.with_name(f".{STATS_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(running=running)), encoding="utf-8")
            tmp.replace(self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            raise

    def start(self) -> None:
        """Write the first snapshot and start the thread that rewrites it."""
        self.write()
        self._thread.start()

    def stop(self) -> None:
        """Stop rewriting, then write the final snapshot (``running: false``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._write_logged(running=False)

    def _write_logged(self, *, running: bool = True) -> None:
        """:meth:`write`; a failure (disk full, say) is logged: metrics go stale, ingest goes on."""
        try:
            self.write(running=running)
        except OSError as exc:
            logger.warning(
                "ingest stats: cannot write %s (%s: %s); hint: check the space and permissions "
                "of that directory; /metrics shows edgesieve_ingest_up 0 until a write works",
                self.path,
                type(exc).__name__,
                exc,
            )

    def _run(self) -> None:
        written = time.monotonic()
        while not self._stop.wait(SAMPLE_S):
            if time.monotonic() - written >= INTERVAL_S:
                written = time.monotonic()
                self._write_logged()  # samples too
            else:
                self.journal.sample_commits()
