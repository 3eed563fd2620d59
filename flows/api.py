"""The flow API: one :class:`Edge` owns a flow's runtime.

A flow is a function ``build(edge)`` that names its inputs and outputs::

    def build(edge: Edge) -> None:
        dev = edge.devices("in", channels=["telemetry"])
        pressure = op.filter("pressure", dev.readings, lambda kv: kv[1].key == "pressure")
        edge.output("pressure_points", deadband("deadband", pressure, absolute=0.2),
                    like="telemetry_points")

The edge brings the configuration (``edge.config``), the device input
(configured transports, or recorded messages in tests), decoding with dead
letters routed for you, accounting for the reduction report, Parquet and
cloud sinks per output stream, MQTT publishing, a clean stop and the cloud
link, which starts when the flow runs, not when it is built.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import cluster_main
from prometheus_client import CollectorRegistry

from connectors.common.stores import StoreRecoveryCollector, heal_recovery_store
from connectors.devices.journal_source import JournalSource
from connectors.devices.reader_priority import PRIORITY
from connectors.sinks.duckdb import PeriodicCopy
from connectors.streams import declare
from connectors.uplink.wire import priority_of
from flows.accounting import FlowReport, IngestCollector, JournalCollector, Meter, report
from flows.cloud import CloudLink
from flows.config import ConfigError, EdgeConfig, check_environment
from flows.ingest import (
    CHANNELS,
    to_dead_letter,
)
from flows.ingest_process import journal_partition_count
from flows.ingest_stats import read_snapshot
from flows.ingest_supervisor import JournalFeed
from flows.inputs import Devices, decoded_devices, unkeyed
from flows.outputs import Output, attach_outputs, by_device, cloud_default
from flows.status import RECENT_ALARMS, edge_status
from flows.transports import require_transports
from operators.records import (
    TELEMETRY,
    DeadLetter,
    RawMessage,
)

__all__ = ["Devices", "Edge", "RunResult"]

log = logging.getLogger("edgesieve.run")

DROPPED = "dropped_"
"""Prefix of the stages counting what a filter dropped: ``dropped_<step>_<reason>``."""


@dataclass
class RunResult:
    """The outcome of one run: a traffic report per flow."""

    reports: dict[str, FlowReport]


class _Shared:
    """What every part of one flow shares: the dataflow, stop, registry and the cloud link."""

    def __init__(self, config: EdgeConfig, name: str, stop: threading.Event | None) -> None:
        self.flow = Dataflow(name)
        self.stop = stop if stop is not None else threading.Event()
        self.registry = CollectorRegistry()
        self.registry.register(StoreRecoveryCollector(config.data_dir))
        self.owners: dict[str, Edge] = {}
        self.devices: Devices | None = None
        self.sources: list[object] = []
        self.errors: Stream[tuple[str, DeadLetter]] | None = None
        self.finished = False
        self.link = CloudLink(config, self.registry) if config.cloud is not None else None
        self.parts: list[Edge] = []
        self.ingest: JournalFeed | None = None
        self.alarms: deque[Any] = deque(maxlen=RECENT_ALARMS)
        """The latest alarm rows the flow wrote, oldest first (for the status)."""
        self.started_at: datetime | None = None
        self.stopped = False


class Edge:
    """One flow's runtime: config, input, accounting, sinks, the cloud link, stop.

    ``Edge(config, name="myflow")`` then ``build(edge)`` then ``edge.run()``.
    ``source`` replaces the configured transports with recorded messages
    (tests, benchmarks); ``stop`` ends the flow cleanly when set.
    """

    def __init__(
        self,
        config: EdgeConfig,
        *,
        name: str = "flow",
        stop: threading.Event | None = None,
        source: Source[RawMessage] | None = None,
    ) -> None:
        if not isinstance(config, EdgeConfig):
            msg = (
                f"Edge: config must be an EdgeConfig (got {type(config).__name__}); "
                "hint: load it with flows.config.load_config('edge.yaml')"
            )
            raise TypeError(msg)
        if not isinstance(name, str) or not name or "." in name:
            msg = (
                f"Edge: name must be a non-empty string without '.' (got {name!r}); "
                "hint: the flow's module name, e.g. 'telemetry'"
            )
            raise ValueError(msg)
        self.config = config
        self.name = name
        self._source = source
        self._shared = _Shared(config, name, stop)
        self.meter = Meter(name, self._shared.registry)
        self._prefix = ""
        self._outputs: dict[str, Output] = {}
        self._letters = 0
        self._shared.parts.append(self)

    # -- structure ---------------------------------------------------------------------------

    @property
    def flow(self) -> Dataflow:
        """The Bytewax dataflow being built (for ``op.input`` of your own sources)."""
        return self._shared.flow

    @property
    def stop(self) -> threading.Event:
        """Set it to stop the flow cleanly (SIGTERM/SIGINT do when run by ``edgesieve run``)."""
        return self._shared.stop

    def part(self, name: str, *, channel: str | Iterable[str] | None = None) -> Edge:
        """A named part of this flow with its own report, e.g. telemetry and vibration in one flow.

        Step ids made with :meth:`id` and the part's outputs are prefixed with
        ``name``. With ``channel`` (one or several), the messages and dead
        letters of that device channel are counted in this part's report.
        """
        self._check_open("part")
        part = object.__new__(Edge)
        part.config = self.config
        part.name = name
        part._source = None
        part._shared = self._shared
        part.meter = self.meter.sibling(name)
        part._prefix = f"{name}_"
        part._outputs = {}
        part._letters = 0
        self._shared.parts.append(part)
        channels = () if channel is None else (channel,) if isinstance(channel, str) else channel
        for one in channels:
            if one not in CHANNELS:
                msg = (
                    f"Edge.part({name!r}): channel {one!r} is not a device channel; "
                    f"hint: one of {', '.join(CHANNELS)}"
                )
                raise ValueError(msg)
            self._shared.owners[one] = part
        return part

    def id(self, step_id: str) -> str:
        """``step_id`` made unique to this part (unchanged on the flow itself)."""
        return f"{self._prefix}{step_id}"

    @property
    def recovery_dir(self) -> Path:
        """The Bytewax recovery database of the flow: ``data_dir/recovery/<flow name>``."""
        return self.config.data_dir / "recovery" / self._shared.flow.flow_id

    # -- input -------------------------------------------------------------------------------

    def devices(self, step_id: str, *, channels: Iterable[str] = CHANNELS) -> Devices:
        """Device messages of ``channels``, decoded, counted and keyed.

        Input comes from the ingest journal (``data_dir/journal``), which the
        ingest process fills from every configured transport when the flow
        runs (MQTT subscribes to ``channels``; HTTP and CoAP serve the whole
        device API and messages of other channels become dead letters), or
        from ``source``. Call it once per flow and share the result between
        steps.
        """
        self._check_open("devices")
        shared = self._shared
        wanted = tuple(channels) if not isinstance(channels, str) else (channels,)
        for channel in wanted:
            if channel not in CHANNELS:
                msg = (
                    f"Edge.devices({step_id!r}): unknown channel {channel!r}; "
                    f"hint: channels are {', '.join(CHANNELS)}"
                )
                raise ValueError(msg)
        if not wanted:
            msg = f"Edge.devices({step_id!r}): channels is empty; hint: channels=['telemetry']"
            raise ValueError(msg)
        if shared.devices is not None:
            msg = (
                f"Edge.devices({step_id!r}): the flow already has its device input; "
                "hint: call devices() once and use the same Devices in every step"
            )
            raise ValueError(msg)
        sid = self.id(step_id)
        if self._source is not None:
            raw = op.input(sid, shared.flow, self._source)
            shared.sources.append(self._source)
        else:
            require_transports(self.config)
            journal = JournalSource(
                self.config.data_dir / "journal",
                reader=self.name,
                partitions=journal_partition_count(self.config),
                recovery=self.recovery_dir if self.config.recovery.enabled else None,
            )
            raw = op.input(sid, shared.flow, journal)
            shared.ingest = JournalFeed(self.config, wanted, journal)
            shared.registry.register(JournalCollector(journal))
            ingest = shared.ingest
            shared.registry.register(IngestCollector(journal.root, lambda: ingest.restarts))
        shared.devices, shared.errors = decoded_devices(
            sid,
            raw,
            self.config,
            channels=wanted,
            flow=self.name,
            owner_of=lambda channel: shared.owners.get(channel, self),
        )
        return shared.devices

    # -- outputs -----------------------------------------------------------------------------

    def output(
        self,
        stream: str,
        up: Stream[Any],
        *,
        like: str | None = None,
        schema: pa.Schema | None = None,
        time_column: str | None = None,
        cloud: bool | None = None,
        local: bool = True,
        priority: int | None = None,
        max_file_age: timedelta | None = None,
    ) -> None:
        """Write ``up`` to the output stream ``stream``: Parquet, and the cloud per config.

        ``up`` holds records with attributes (or dict keys) named like the
        stream's columns, keyed or not. A stream of the standard flows needs
        nothing more; a new one takes its columns ``like=`` an existing stream
        or from ``schema`` and ``time_column`` (the ``timestamp[us, UTC]``
        column that picks the ``date=`` partition). ``cloud`` overrides whether
        it is sent to the cloud (default: summaries, features and alarms; points
        with ``cloud.send_points``; a new stream like its model, else yes);
        ``max_file_age`` overrides ``parquet.max_file_age`` for this stream.
        ``local=False`` sends ``up`` to the cloud only (not to Parquet/DuckDB):
        e.g. every feature row local with ``cloud=False`` and the reported
        ones to the cloud with ``local=False``.
        Outputs of one stream from several steps are merged into one.
        """
        self._check_open("output")
        where = f"Edge.output({stream!r})"
        spec, model = declare(where, stream, like=like, schema=schema, time_column=time_column)
        if not local and cloud is False:
            msg = (
                f"{where}: local=False and cloud=False send the stream nowhere; "
                "hint: drop local=False to keep it on the edge"
            )
            raise ValueError(msg)
        if cloud is None:
            cloud = cloud_default(self.config, model)
        if priority is None:
            priority = priority_of(model)
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
            msg = f"{where}: priority must be an int >= 0 (got {priority!r}); hint: alarms use 0"
            raise ValueError(msg)
        existing = self._outputs.get(stream)
        if existing is None:
            existing = self._outputs[stream] = Output(spec, model, priority, max_file_age)
        elif existing.spec.schema != spec.schema:
            msg = (
                f"{where}: the stream was already declared with other columns; "
                "hint: give every output of one stream the same like=/schema="
            )
            raise ValueError(msg)
        existing.streams.append((up, local, cloud))

    def dead_letters(self, up: Stream[Any], *, reason: str | None = None) -> None:
        """Send more items to this flow's ``dead_letters`` stream, keyed or not.

        Dead letters go as they are; readings and vibration blocks (e.g. a
        window's late readings) become dead letters with ``reason``, their
        payload in the device API's shape so nothing is lost.
        """
        if reason is None:
            self.output("dead_letters", up)
            return
        self._letters += 1
        letters = op.map(
            self.id(f"dead_letters_{self._letters}"),
            up,
            lambda item: to_dead_letter(unkeyed(item), reason),
        )
        self.output("dead_letters", letters)

    def count_dropped(self, step_id: str, dropped: Stream[Any]) -> None:
        """Count what a filter dropped, per reason and device, and discard it.

        ``dropped`` is a ``filter_items`` step's ``dropped`` stream. Each item
        adds one to the stage ``dropped_<filter step>_<reason>`` of this part's
        report and of ``edgesieve_messages`` on ``/metrics``.
        """
        self._check_open("count_dropped")
        meter = self.meter

        def tally(batch: list[Any]) -> tuple[()]:
            stages: dict[str, Tally[str]] = {}
            for item in batch:
                gone = unkeyed(item)
                stage = f"{DROPPED}{gone.step_id}_{gone.reason}"
                stages.setdefault(stage, Tally())[by_device(gone.item)[0]] += 1
            for stage, devices in stages.items():
                meter.add(stage, devices)
            return ()

        op.flat_map_batch(self.id(step_id), dropped, tally)

    def publish(
        self,
        step_id: str,
        up: Stream[Any],
        *,
        topic: Callable[[Any], str],
        payload: Callable[[Any], bytes],
    ) -> None:
        """Publish each item of ``up`` on the configured MQTT broker at once (e.g. alarms).

        Without ``transports.mqtt`` nothing is published; the items still
        reach their output streams.
        """
        self._check_open("publish")
        if self.config.transports.mqtt is None:
            return
        from connectors.sinks.mqtt import MqttSink
        from flows.transports import mqtt_settings

        settings = mqtt_settings(self.config, channels=(self.name,), role=step_id)
        sink = MqttSink(settings, topic=topic, payload=payload)
        op.output(self.id(step_id), op.map(self.id(f"{step_id}_key"), up, by_device), sink)

    # -- running -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the ingest process is subscribed and listening (or every given source is)."""
        ingest = self._shared.ingest
        if ingest is not None:
            return ingest.ready
        return all(getattr(source, "ready", True) for source in self._shared.sources)

    def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`ready` while the flow runs; return it."""
        deadline = time.monotonic() + timeout
        while not self.ready and not self.stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.ready

    @property
    def state(self) -> str:
        """``starting``, ``running`` (inputs ready), ``stopping`` (stop set) or ``stopped``."""
        shared = self._shared
        if shared.stopped:
            return "stopped"
        if self.stop.is_set():
            return "stopping"
        if shared.started_at is not None and self.ready:
            return "running"
        return "starting"

    def status(self) -> dict[str, Any]:
        """What the flow is doing now: :func:`flows.status.edge_status` (cheap, any thread)."""
        return edge_status(self)

    def dataflow(self) -> Dataflow:
        """Finish the flow (sinks, dead letters) and return it for any Bytewax runner."""
        shared = self._shared
        if not shared.finished:
            shared.parts[0]._route_leftovers()
            for part in shared.parts:
                part._attach_outputs()
            shared.finished = True
        return shared.flow

    def run(self, *, workers: int = 1) -> RunResult:
        """Run until the input ends or :attr:`stop` is set; write and return the reports."""
        from flows.runtime import lifecycle, serve_status, stop_on_signals

        check_environment(self.config)
        flow = self.dataflow()
        data_dir = self.config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self._shared.started_at = datetime.now(UTC)
        self._shared.stopped = False
        server = serve_status(self.config, self._shared.registry, self.status)
        lifecycle.info(
            "flow %s starting with %d worker(s), data in %s", self.name, workers, data_dir
        )
        copier = self._duckdb_copier()
        with stop_on_signals(self.stop):  # also while closing: a second SIGTERM must not kill it
            completed = False
            try:
                recovery = self.recovery_config(workers)
                self.start_ingest()
                with PRIORITY.adopted():  # its join loop wakes every millisecond
                    cluster_main(
                        flow,
                        [],
                        0,
                        worker_count_per_proc=workers,
                        epoch_interval=self.config.recovery.snapshot_interval,
                        recovery_config=recovery,
                    )
                completed = True
            finally:
                if copier is not None:
                    copier.stop()
                try:
                    self.close(completed=completed)
                finally:
                    self._shared.stopped = True
                    if server is not None:
                        server.close()
            lifecycle.info("flow %s stopped", self.name)
            return RunResult(self.reports(write=True))

    def _duckdb_copier(self) -> PeriodicCopy | None:
        sinks = self.config.sinks
        if not sinks.duckdb or sinks.duckdb_copy_every is None:
            return None
        data_dir = self.config.data_dir
        return PeriodicCopy(
            data_dir / "edge.duckdb", data_dir / "edge-copy.duckdb", sinks.duckdb_copy_every
        ).start()

    def recovery_config(self, workers: int = 1) -> RecoveryConfig | None:
        """The recovery database of this flow, created on first start; None when disabled.

        :meth:`run` uses it; with another runner pass ``-r`` :attr:`recovery_dir`
        and ``-s`` the snapshot interval (``python -m bytewax.run``).
        """
        settings = self.config.recovery
        if not settings.enabled:
            return None
        db_dir = self.recovery_dir
        heal_recovery_store(db_dir)
        count = len(list(db_dir.glob("part-*.sqlite3"))) if db_dir.is_dir() else 0
        if count == 0:
            db_dir.mkdir(parents=True, exist_ok=True)
            count = max(settings.partitions, workers)
            init_db_dir(db_dir, count)
            log.info("recovery: created %s with %d partitions", db_dir, count)
        if workers > count:
            msg = (
                f"recovery.partitions: {db_dir} was created with {count} partitions, fewer "
                f"than the {workers} workers asked for; hint: run with at most {count} "
                "workers, or stop the flow cleanly and move that directory away to start "
                "from the journal's released offsets"
            )
            raise ConfigError(msg)
        return RecoveryConfig(str(db_dir))

    def start_ingest(self) -> None:
        """Start the ingest process that fills the journal (none with a given ``source``).

        :meth:`run` does it; call it yourself only when running :meth:`dataflow`
        with another runner, and :meth:`close` after.
        """
        if self._shared.ingest is not None:
            self._shared.ingest.start(self.stop)

    def close(self, *, completed: bool = False) -> None:
        """Stop ingest, release the journal if the flow ``completed``, stop the cloud link.

        ``completed`` says the dataflow ended normally (every sink closed), so
        everything it read from the journal is done with. Idempotent.
        """
        ingest = self._shared.ingest
        try:
            if ingest is not None:
                ingest.stop()
                if completed:
                    ingest.source.release_emitted()
        finally:
            if self._shared.link is not None:
                self._shared.link.close()

    def reports(self, *, write: bool = False) -> dict[str, FlowReport]:
        """The traffic report of each part that did something; the flow's own when none did."""
        parts = self._shared.parts
        ingest = self._shared.ingest
        snapshot = read_snapshot(ingest.source.root) if ingest is not None else None
        every = {
            part.name: report(
                part.meter,
                ingest.source if ingest is not None else None,
                ingest=snapshot,
                restarts=ingest.restarts if ingest is not None else 0,
            )
            for part in parts
        }
        out = {name: rep for name, rep in every.items() if not rep.idle}
        if not out:  # an idle run: one report, the flow's own, says so
            out = {parts[0].name: every[parts[0].name]}
        if write:
            for name, rep in out.items():
                rep.write(self.config.data_dir / f"report-{name}.json")
        return out

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._shared.finished:
            msg = (
                f"Edge.{what}(): the flow {self._shared.flow.flow_id!r} is already finished "
                "(dataflow() or run() was called); hint: declare everything inside build(edge)"
            )
            raise RuntimeError(msg)

    def _attach_outputs(self) -> None:
        if not self._outputs:
            return
        recovery = self.recovery_dir if self.recovery_config() is not None else None
        attach_outputs(
            self._outputs,
            self.config,
            self.meter,
            self.id,
            link=self._shared.link,
            alarms=self._shared.alarms,
            recovery_dir=recovery,
        )

    def _route_leftovers(self) -> None:
        """Dead-letter decode errors and any kind of record no step took."""
        shared = self._shared
        if shared.devices is None or shared.errors is None:
            return
        if self.config.sinks.raw_readings:  # before the unused check: these are kept
            owner = shared.owners.get(TELEMETRY, self)
            owner.output(
                "raw_readings", shared.devices.readings, like="telemetry_points", cloud=False
            )
        flow_name = self.name
        letters: list[Stream[DeadLetter]] = []
        for kind, stream in shared.devices.unused().items():
            reason = f"no step of flow {flow_name!r} takes device {kind}"
            letters.append(
                op.map(
                    f"_unused_{kind}",
                    stream,
                    lambda item, reason=reason: to_dead_letter(unkeyed(item), reason),
                )
            )
        owners = {id(p): p for p in shared.owners.values()}
        if not owners:
            self.dead_letters(op.merge("_dead_letters", shared.errors, *letters))
            return
        for part in owners.values():
            mine = op.filter(
                f"_errors_{part.name}", shared.errors, lambda kv, n=part.name: kv[0] == n
            )
            part.dead_letters(mine)
        owned = {part.name for part in owners.values()}
        rest = op.filter("_errors_unowned", shared.errors, lambda kv: kv[0] not in owned)
        self.dead_letters(op.merge("_dead_letters", rest, *letters))
