"""Running flows: wiring config to connectors, clean shutdown and the report.

A clean stop works through the dataflow itself: ``SIGTERM``/``SIGINT`` set a
stop event, sources drain what they accepted and end their input, Bytewax then
closes every open window (end of input), and sinks flush on close.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Protocol

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import Source
from bytewax.testing import cluster_main
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from connectors.devices.ingress import DeviceServer, DeviceServers, Ingress
from connectors.devices.mqtt import MqttSettings, MqttSource
from connectors.devices.registry import DeviceRegistry
from connectors.sinks.cloud import CloudSink, CloudSinkSettings
from connectors.sinks.parquet import ParquetSettings, ParquetSink
from connectors.uplink.outbox import Outbox, OutboxSettings
from connectors.uplink.sender import UplinkSender, UplinkSettings
from flows.accounting import FlowReport, Meter, report
from flows.config import ConfigError, EdgeConfig, load_config
from operators.records import RawMessage

__all__ = [
    "CloudLink",
    "FlowBuilder",
    "RunResult",
    "close_cloud_links",
    "cloud_link",
    "cloud_sink",
    "channel_flow",
    "device_inputs",
    "flow_inputs",
    "install_stop_handlers",
    "lazy_flow",
    "load_flow_builder",
    "mqtt_settings",
    "mqtt_source",
    "parquet_sink",
    "run_flow",
    "stop_on_signals",
]

log = logging.getLogger("edgesieve.run")

CONFIG_ENV = "EDGESIEVE_CONFIG"


class FlowBuilder(Protocol):
    """What a flow module provides: ``build(config, *, stop, meter) -> Dataflow``."""

    def __call__(
        self, config: EdgeConfig, *, stop: threading.Event | None = ..., meter: Meter | None = ...
    ) -> Dataflow:
        """Build the dataflow."""
        ...


def mqtt_settings(
    config: EdgeConfig, *, channels: tuple[str, ...], role: str = "ingest"
) -> MqttSettings:
    """Client settings from ``transports.mqtt``.

    The client id is ``{client_id}-{channels}`` (``-{role}`` for publishers), so
    flows sharing one broker never take each other's session.
    """
    section = config.transports.mqtt
    if section is None:
        msg = (
            "transports.mqtt is not configured, so the flow has no input; "
            'add transports: {mqtt: {url: "mqtt://127.0.0.1:1883"}} to the config'
        )
        raise ConfigError(msg)
    base = section.client_id or f"edgesieve-{config.edge_id}"
    client_id = f"{base}-{'-'.join(channels)}"
    if role != "ingest":
        client_id = f"{client_id}-{role}"
    return MqttSettings(
        url=section.url,
        qos=section.qos,
        channels=channels,
        client_id=client_id,
        username=section.username,
        password=section.password,
        protocol=section.protocol,
        persistent=section.persistent,
        keepalive_s=section.keepalive,
        buffer_messages=section.buffer_messages,
    )


def mqtt_source(
    config: EdgeConfig, *, channels: tuple[str, ...], stop: threading.Event | None
) -> MqttSource:
    """The MQTT source for ``channels`` from ``transports.mqtt``."""
    return MqttSource(mqtt_settings(config, channels=channels), stop=stop)


def flow_inputs(
    flow: Dataflow,
    config: EdgeConfig,
    *,
    channels: tuple[str, ...],
    stop: threading.Event | None,
    source: Source[RawMessage] | None,
) -> Stream[RawMessage]:
    """``source`` when given (tests, benchmarks, recorded data), else :func:`device_inputs`."""
    if source is not None:
        return op.input("ingest", flow, source)
    return device_inputs(flow, config, channels=channels, stop=stop)


def channel_flow(
    channel: str,
    pipeline: Callable[[str, Stream[RawMessage], EdgeConfig, Meter], None],
    config: EdgeConfig,
    *,
    stop: threading.Event | None,
    meter: Meter | None,
    source: Source[RawMessage] | None,
) -> Dataflow:
    """A dataflow named ``channel`` running ``pipeline`` on that channel's messages."""
    meter = meter if meter is not None else Meter(channel)
    flow = Dataflow(channel)
    raw = flow_inputs(flow, config, channels=(channel,), stop=stop, source=source)
    pipeline(channel, raw, config, meter)
    return flow


def device_inputs(
    flow: Dataflow,
    config: EdgeConfig,
    *,
    channels: tuple[str, ...],
    stop: threading.Event | None,
) -> Stream[RawMessage]:
    """One stream of device messages from every configured transport.

    MQTT subscribes to ``channels``; the HTTP and CoAP servers (which need the
    device registry) serve every channel of the device API.
    """
    transports = config.transports
    streams: list[Stream[RawMessage]] = []
    if transports.mqtt is not None:
        streams.append(op.input("mqtt", flow, mqtt_source(config, channels=channels, stop=stop)))
    servers: list[DeviceServer] = []
    if transports.http is not None or transports.coap is not None:
        assert config.devices is not None  # checked when the config was loaded
        registry = DeviceRegistry.load(config.devices)
        ingress = Ingress(
            max_messages=transports.queue_messages, max_payload_bytes=config.max_payload_bytes
        )
        if transports.http is not None:
            from connectors.devices.http import HttpServer

            servers.append(HttpServer(transports.http.listen, registry, ingress))
        if transports.coap is not None:
            from connectors.devices.coap import CoapServer

            servers.append(CoapServer(transports.coap.listen, registry, ingress))
        streams.append(op.input("servers", flow, DeviceServers(ingress, servers, stop=stop)))
    if not streams:
        msg = (
            "no transport is configured, so the flow has no input; add transports.mqtt, "
            "transports.http or transports.coap to the config"
        )
        raise ConfigError(msg)
    return streams[0] if len(streams) == 1 else op.merge("transports", *streams)


@dataclass
class CloudLink:
    """The process's outbox and sender for one data directory."""

    outbox: Outbox
    sender: UplinkSender


_links: dict[Path, CloudLink] = {}
_links_lock = threading.Lock()
CLOUD_FLUSH_S = 10.0
"""How long a clean stop waits for the cloud to acknowledge what is in the outbox."""


def cloud_link(config: EdgeConfig, registry: CollectorRegistry | None = None) -> CloudLink | None:
    """The outbox and running sender for ``config`` (one per data directory), or None."""
    cloud = config.cloud
    if cloud is None:
        return None
    path = (config.data_dir / "outbox.sqlite").resolve()
    with _links_lock:
        link = _links.get(path)
        if link is not None:
            return link
        path.parent.mkdir(parents=True, exist_ok=True)
        outbox = Outbox(
            path, OutboxSettings(max_bytes=cloud.outbox_max_bytes, ttl=cloud.outbox_ttl)
        )
        tls = cloud.tls
        sender = UplinkSender(
            outbox,
            UplinkSettings(
                target=cloud.target,
                key=cloud.key,
                secret=cloud.secret,
                tls_ca=tls.ca if tls else None,
                tls_cert=tls.cert if tls else None,
                tls_key=tls.key if tls else None,
                backoff_max_s=cloud.backoff_max.total_seconds(),
                bandwidth_bytes_per_s=cloud.bandwidth_bytes_per_s,
            ),
        )
        sender.start()
        link = _links[path] = CloudLink(outbox, sender)
        if registry is not None:
            registry.register(_UplinkCollector(link))
        return link


def close_cloud_links(flush_s: float | None = None) -> None:
    """Give the cloud ``flush_s`` to take what is queued, then stop; the rest stays queued."""
    with _links_lock:
        links = list(_links.values())
        _links.clear()
    for link in links:
        if not link.sender.flush(timeout=CLOUD_FLUSH_S if flush_s is None else flush_s):
            stats = link.outbox.stats()
            log.warning(
                "cloud did not acknowledge everything before shutdown: %d batch(es), %d bytes "
                "stay in the outbox and are sent at the next start",
                stats.batches,
                stats.bytes,
            )
        link.sender.stop()
        link.outbox.close()


class _UplinkCollector(Collector):
    """Outbox depth and connection state as Prometheus gauges."""

    def __init__(self, link: CloudLink) -> None:
        self._link = link

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._link.outbox.closed:
            return
        stats = self._link.outbox.stats()
        yield GaugeMetricFamily(
            "edgesieve_outbox_batches", "Batches waiting for the cloud", value=stats.batches
        )
        yield GaugeMetricFamily(
            "edgesieve_outbox_bytes", "Bytes waiting for the cloud", value=stats.bytes
        )
        yield GaugeMetricFamily(
            "edgesieve_outbox_oldest_age_seconds",
            "Age of the oldest waiting batch",
            value=stats.oldest_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "edgesieve_outbox_dropped_full",
            "Batches dropped because the outbox was full",
            value=stats.dropped_full,
        )
        yield GaugeMetricFamily(
            "edgesieve_outbox_expired", "Batches dropped after their TTL", value=stats.expired
        )
        yield GaugeMetricFamily(
            "edgesieve_cloud_connected",
            "1 while the uplink stream is open",
            value=1.0 if self._link.sender.state == "connected" else 0.0,
        )


def cloud_sink(
    config: EdgeConfig, stream: str, meter: Meter, *, claims_raw_bytes: bool = False
) -> CloudSink | None:
    """A sink sending ``stream`` to the cloud through the outbox, or None without ``cloud``.

    The sink of a flow's main reduced stream claims the device bytes its
    batches stand for (``claims_raw_bytes``), so the batches' ``raw_bytes``
    add up to what the flow received.
    """
    link = cloud_link(config, meter.registry)
    if link is None or config.cloud is None:
        return None
    return CloudSink(
        link.outbox,
        config.edge_id,
        stream,
        settings=CloudSinkSettings(
            max_rows=config.cloud.batch_rows, max_age=config.cloud.batch_age
        ),
        raw_bytes=(lambda rows: meter.claim_raw_bytes()) if claims_raw_bytes else None,
        on_seal=lambda sealed: meter.on_wire(sealed.stream, sealed.rows, len(sealed.payload)),
    )


def parquet_sink(
    config: EdgeConfig, stream: str, meter: Meter, *, max_file_age: timedelta | None = None
) -> ParquetSink:
    """A Parquet sink for ``stream`` under ``data_dir/parquet`` that reports to ``meter``.

    ``max_file_age`` overrides ``parquet.max_file_age`` for streams that must
    land promptly (alarms).
    """
    settings = ParquetSettings(
        max_file_bytes=config.parquet.max_file_bytes,
        max_file_age=max_file_age if max_file_age is not None else config.parquet.max_file_age,
    )
    return ParquetSink(
        config.data_dir / "parquet", stream, settings=settings, on_write=meter.on_file
    )


def install_stop_handlers(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT request a clean stop (a second SIGINT aborts)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s received: stopping cleanly", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """:func:`install_stop_handlers` for a block; the previous handlers come back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    install_stop_handlers(stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_flow_builder(flow: str) -> FlowBuilder:
    """Find ``build`` in a flow module name (``flows.telemetry``) or a ``.py`` path."""
    module: ModuleType
    if flow.endswith(".py") or os.sep in flow:
        path = Path(flow)
        if not path.is_file():
            msg = (
                f"flow file {flow!r} does not exist; "
                "give a module such as flows.telemetry or a .py path"
            )
            raise ConfigError(msg)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(flow)
        except ModuleNotFoundError as exc:
            if exc.name and flow.startswith(exc.name):
                msg = f"flow module {flow!r} not found; standard flows: flows.telemetry"
                raise ConfigError(msg) from None
            raise
    build = getattr(module, "build", None)
    if not callable(build):
        msg = f"flow {flow!r} has no build(config, *, stop, meter) function"
        raise ConfigError(msg)
    return build  # type: ignore[no-any-return]


@dataclass
class RunResult:
    """The outcome of one run: a traffic report per flow."""

    reports: dict[str, FlowReport]


def run_flow(
    build: FlowBuilder,
    config: EdgeConfig,
    *,
    workers: int = 1,
    stop: threading.Event | None = None,
    meter: Meter | None = None,
    handle_signals: bool = True,
) -> RunResult:
    """Build and run a flow in this process until its input ends or ``stop`` is set."""
    stop = stop if stop is not None else threading.Event()
    config.data_dir.mkdir(parents=True, exist_ok=True)
    if meter is None:
        flow_name = getattr(build, "__module__", "flow").rsplit(".", 1)[-1]
        meter = Meter(flow_name)
    flow = build(config, stop=stop, meter=meter)
    if config.metrics_listen:
        host, _, port = config.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=meter.registry)
    log.info(
        "flow %s starting with %d worker(s), data in %s", flow.flow_id, workers, config.data_dir
    )
    try:
        with stop_on_signals(stop) if handle_signals else nullcontext():
            cluster_main(flow, [], 0, worker_count_per_proc=workers)
    finally:
        close_cloud_links()
    reports: dict[str, FlowReport] = {}
    for member in meter.family():
        rep = report(member)
        if rep.messages_in or member is meter:
            rep.write(config.data_dir / f"report-{member.flow}.json")
            reports[member.flow] = rep
    return RunResult(reports)


def lazy_flow(module: str, build: FlowBuilder) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds ``flow`` on first access.

    This lets ``python -m bytewax.run flows.telemetry`` work: the config comes
    from ``$EDGESIEVE_CONFIG`` (default ``edge.yaml``), and SIGTERM/SIGINT stop
    the flow cleanly.
    """
    built: dict[str, Dataflow] = {}

    def __getattr__(name: str) -> Any:  # noqa: N807
        if name != "flow":
            msg = f"module {module!r} has no attribute {name!r}"
            raise AttributeError(msg)
        if "flow" not in built:
            config = load_config(os.environ.get(CONFIG_ENV, "edge.yaml"))
            config.data_dir.mkdir(parents=True, exist_ok=True)
            stop = threading.Event()
            install_stop_handlers(stop)
            built["flow"] = build(config, stop=stop)
            atexit.register(close_cloud_links)
        return built["flow"]

    return __getattr__
