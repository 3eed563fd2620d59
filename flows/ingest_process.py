"""The ingest process: device transports writing to the ingest journal.

:func:`run_ingest` opens the :class:`~connectors.devices.journal.Journal`
under ``data_dir/journal``, starts the journaled MQTT client (with
``transports.mqtt``) and the HTTP and CoAP servers (with ``transports.http`` /
``transports.coap``) and the ThingsBoard MQTT endpoint (with
``transports.mqtt_server``), each of which tells a device "accepted" only after
its message is committed. A clean stop stops accepting, lets the journal commit
what was submitted (the PUBACKs of those go out), then disconnects.

The flow's process runs it through :class:`flows.ingest_supervisor.IngestSupervisor`.

Its counters (journal depth and commits, commit latency histogram, refusals,
withheld PUBACKs) go to ``data_dir/journal/ingest-stats.json`` every second
(:mod:`flows.ingest_stats`), where the flow process's ``/metrics`` reads them.

Standalone: ``python -m flows.ingest_process --config edge.yaml`` (SIGTERM or
SIGINT: clean stop). A failure to start (port in use, unusable journal) is one
log line and exit status 2; a broker refusing the credentials is one log line
per change of state while the client retries with backoff. Under the
supervisor, a first start that fails sends that line to the parent
(``IngestSupervisor.failure``) and is not retried when trying again
cannot help (a port in use, a bad registry): the flow stops and ``edgesieve
run`` prints the line and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from connectors.devices.ingress import DeviceServer, Ingress
from connectors.devices.journal import JournalSettings, journal_partitions
from connectors.devices.mqtt.journaled import JournaledMqtt
from connectors.devices.mqtt_server import MqttServer
from connectors.devices.reader_priority import reset_inherited
from connectors.devices.registry import DeviceRegistry
from flows.config import ConfigError, EdgeConfig, environment_problems, load_config
from flows.console import LogSetup
from flows.ingest_stats import MeteredJournal, StatsWriter
from flows.transports import mqtt_settings
from operators.records import TELEMETRY, VIBRATION

__all__ = [
    "journal_partition_count",
    "journal_settings",
    "run_ingest",
]

logger = logging.getLogger("edgesieve.ingest")
lifecycle = logging.getLogger("edgesieve.lifecycle")
"""Ready, stopping, stopped: shown on the console without ``-v``."""

START_FAILED: Final = 2
"""Exit status of an ingest process that could not start (the reason is logged)."""
INGEST_LOG_FILE: Final = "ingest.log"
"""The ingest process's log file, beside the flow process's (one writer per rotating file)."""
_POLL_S: Final = 0.05
_PARENT_POLL_S: Final = 0.2


def journal_partition_count(config: EdgeConfig) -> int:
    """``journal.partitions``, or when unset the existing journal's own count, else 1."""
    if config.journal.partitions is not None:
        return config.journal.partitions
    return journal_partitions(config.data_dir / "journal") or 1


def journal_settings(config: EdgeConfig) -> JournalSettings:
    """The journal of ``config``: ``data_dir/journal`` with the ``journal`` section's settings."""
    section = config.journal
    return JournalSettings(
        root=config.data_dir / "journal",
        partitions=journal_partition_count(config),
        sync=section.sync,
        max_bytes=section.max_bytes,
        device_share=section.device_share,
    )


def _servers(config: EdgeConfig, ingress: Ingress) -> list[DeviceServer]:
    transports = config.transports
    if transports.http is None and transports.coap is None and transports.mqtt_server is None:
        return []
    assert config.devices is not None  # checked when the config was loaded
    registry = DeviceRegistry.load(config.devices)
    servers: list[DeviceServer] = []
    if transports.http is not None:
        from connectors.devices.http import HttpServer

        servers.append(
            HttpServer(
                transports.http.listen,
                registry,
                ingress,
                max_requests_per_device=transports.http.max_requests_per_device,
            )
        )
    if transports.coap is not None:
        from connectors.devices.coap import CoapServer

        coap = transports.coap
        servers.append(
            CoapServer(
                coap.listen,
                registry,
                ingress,
                max_transfers=coap.max_transfers,
                max_device_transfers=coap.max_device_transfers,
                transfer_timeout_s=coap.transfer_timeout.total_seconds(),
                transfer_deadline_s=coap.transfer_deadline.total_seconds(),
            )
        )
    if transports.mqtt_server is not None:
        section = transports.mqtt_server
        servers.append(
            MqttServer(
                section.listen,
                registry,
                ingress,
                max_inflight=section.max_inflight,
                max_connections=section.max_connections,
                max_device_connections=section.max_device_connections,
            )
        )
    return servers


async def _serve(
    servers: Sequence[DeviceServer],
    mqtt: JournaledMqtt | None,
    stop: threading.Event,
    ready: Callable[[], None] | None,
) -> None:
    started: list[DeviceServer] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        announced = False
        while not stop.is_set():
            if not announced and (mqtt is None or mqtt.ready):
                announced = True
                lifecycle.info("ingest: ready (%s)", _describe(servers, mqtt))
                if ready is not None:
                    ready()
            await asyncio.sleep(_POLL_S)
    finally:
        for server in reversed(started):  # stop accepting; requests in progress get answers
            try:
                await server.stop()
            except Exception as exc:  # noqa: BLE001 - one line, then the rest still stop
                logger.error("ingest: the %s server did not stop cleanly: %s", server.name, exc)


def _describe(servers: Sequence[DeviceServer], mqtt: JournaledMqtt | None) -> str:
    parts = [server.name for server in servers]
    if mqtt is not None:
        parts.insert(0, f"mqtt {mqtt.settings.host}:{mqtt.settings.port}")
    return ", ".join(parts)


def run_ingest(
    config: EdgeConfig,
    *,
    channels: tuple[str, ...],
    stop: threading.Event,
    ready: Callable[[], None] | None = None,
) -> None:
    """Journal the devices' messages until ``stop`` is set (see the module docstring).

    ``channels`` are the MQTT channels subscribed (the HTTP and CoAP servers
    serve every channel of the device API). ``ready`` is called once, when the
    MQTT client is subscribed and the servers listen.

    :raises ConfigError: when no transport is configured.
    :raises OSError: when a server cannot listen (the message names the address).
    """
    transports = config.transports
    if not any((transports.mqtt, transports.http, transports.coap, transports.mqtt_server)):
        msg = (
            "transports: none is configured, so the ingest process has nothing to serve; "
            "hint: add transports.mqtt, transports.http, transports.coap or transports.mqtt_server "
            "to the config"
        )
        raise ConfigError(msg)
    journal = MeteredJournal(journal_settings(config))
    mqtt: JournaledMqtt | None = None
    stats: StatsWriter | None = None
    try:
        ingress = Ingress(max_payload_bytes=config.max_payload_bytes, journal=journal)
        servers = _servers(config, ingress)
        if transports.mqtt is not None:
            mqtt = JournaledMqtt(mqtt_settings(config, channels=channels), journal)
        mqtt_server = next((s for s in servers if isinstance(s, MqttServer)), None)
        stats = StatsWriter(journal, ingress, mqtt, mqtt_server)
        stats.start()
        if mqtt is not None:
            mqtt.start()
        asyncio.run(_serve(servers, mqtt, stop, ready))
    finally:
        if mqtt is not None:
            mqtt.stop_taking()
        journal.close()  # commits what was submitted; its callbacks queue the PUBACKs
        if mqtt is not None:
            mqtt.close()
        if stats is not None:
            stats.stop()  # the final counters, for the flow's report
        lifecycle.info("ingest: stopped")


# --- the child process --------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """The one-line reason of a start failure (an OSError's own message, without ``[Errno N]``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split())


def _start_failure(config: EdgeConfig, exc: BaseException) -> tuple[str, bool]:
    """The one-line reason ``run_ingest`` failed, and whether trying again cannot help.

    The servers are closed by now, so checking the environment again finds the
    address another program holds (or the unusable ``data_dir``/``devices``)
    and names its config key. A bad config is lasting too; anything else (the
    journal still locked by a previous ingest process that is finishing its
    stop, a port freed meanwhile) may pass on the next try.
    """
    if isinstance(exc, OSError):
        if problems := environment_problems(config):
            return "; ".join(problems), True
        return _reason(exc), False
    return _reason(exc), isinstance(exc, ValueError)


def _watch(
    stop: threading.Event,
    parent_stop: multiprocessing.connection.Connection,
    parent: multiprocessing.process.BaseProcess | None,
) -> None:
    """Set ``stop`` when the supervisor asks, or when the supervisor's process is gone.

    The supervisor asks by writing to (then closing) the pipe ``parent_stop``;
    its end of file means the supervisor's process is gone.
    """
    while not stop.is_set():
        if parent_stop.poll(_PARENT_POLL_S):
            try:
                parent_stop.recv_bytes()
            except EOFError:
                logger.warning("ingest: the supervising process is gone; stopping")
            break
        if parent is not None and not parent.is_alive():
            logger.warning("ingest: the supervising process is gone; stopping")
            break
    stop.set()


def ingest_child(
    config: EdgeConfig,
    channels: tuple[str, ...],
    parent_stop: multiprocessing.connection.Connection,
    ready: Any,
    level: int,
    failed: multiprocessing.connection.Connection,
    logs: LogSetup | None = None,
) -> None:
    """Entry point of the ingest process (spawned): run until the supervisor says stop.

    A failure to start is logged and exits with status 2; when trying again
    cannot help (a port in use, a bad registry) its reason is sent on ``failed``.
    """
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent decides
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a clean stop, as when run standalone
    if logs is not None:  # the parent's console and log directory, a file of its own
        logs.apply(file_name=INGEST_LOG_FILE)
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reset_inherited()  # before any thread starts: threads inherit the CPU policy
    watcher = threading.Thread(
        target=_watch,
        args=(stop, parent_stop, multiprocessing.parent_process()),
        name="edgesieve-ingest-watch",
        daemon=True,
    )
    watcher.start()

    def announce() -> None:
        ready.value = 1

    try:
        run_ingest(config, channels=channels, stop=stop, ready=announce)
    except (OSError, ValueError, RuntimeError) as exc:
        reason, lasting = _start_failure(config, exc)
        logger.error("ingest: cannot run: %s", reason)
        if lasting:
            try:
                failed.send_bytes(reason.encode("utf-8", "replace"))
            except OSError:
                pass  # the supervisor is gone
        sys.exit(START_FAILED)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.ingest_process --config edge.yaml``: run ingest until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m flows.ingest_process", description="Journal device messages."
    )
    parser.add_argument("--config", required=True, help="the edge configuration file")
    parser.add_argument(
        "--channels",
        default=f"{TELEMETRY},{VIBRATION}",
        help="MQTT channels to subscribe, comma-separated (default: %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    LogSetup(verbose=args.verbose).apply()
    reset_inherited()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    channels = tuple(c for c in args.channels.split(",") if c)
    config: EdgeConfig | None = None
    try:
        config = load_config(args.config)
        run_ingest(config, channels=channels, stop=stop)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = _start_failure(config, exc)[0] if config is not None else _reason(exc)
        logger.error("ingest: cannot run: %s", reason)
        return START_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
