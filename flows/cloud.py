"""The cloud link of a running flow: its outbox and uplink sender, opened when the flow starts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from connectors.uplink.outbox import Outbox, OutboxSettings
from connectors.uplink.sender import UplinkSender
from connectors.uplink.settings import UplinkSettings
from flows.config import EdgeConfig

__all__ = ["CloudLink", "LinkStatus"]

log = logging.getLogger("edgesieve.run")


class LinkStatus(NamedTuple):
    """The outbox's depth and the sender's state, for the edge status."""

    batches: int
    bytes: int
    connected: bool
    acked: int


class CloudLink:
    """``data_dir/outbox.sqlite`` and the sender draining it to ``cloud.target``.

    Nothing is opened until :meth:`open` (the first cloud sink partition of a
    running flow calls it); :meth:`close` gives the cloud ``cloud.stop_timeout`` to
    acknowledge what is queued, and the rest stays for the next start.
    """

    def __init__(self, config: EdgeConfig, registry: CollectorRegistry) -> None:
        assert config.cloud is not None
        self._config = config
        self._registry = registry
        self._lock = threading.Lock()
        self._outbox: Outbox | None = None
        self._sender: UplinkSender | None = None
        self._last: LinkStatus | None = None

    @property
    def sender(self) -> UplinkSender | None:
        """The running sender, once opened."""
        return self._sender

    def open(self) -> Outbox:
        """Open the outbox and start the sender (once); return the outbox."""
        with self._lock:
            if self._outbox is not None:
                return self._outbox
            cloud = self._config.cloud
            assert cloud is not None
            path = self._config.data_dir / "outbox.sqlite"
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
            self._outbox, self._sender = outbox, sender
            self._registry.register(_UplinkCollector(outbox, sender))
            return outbox

    def status(self) -> LinkStatus | None:
        """Outbox depth, connection and acknowledged batches; None before :meth:`open`.

        Once closed (or closing), the last figures read, disconnected.
        """
        outbox, sender = self._outbox, self._sender
        last = self._last
        if outbox is None or sender is None or outbox.closed:
            return last._replace(connected=False) if last is not None else None
        try:
            stats = outbox.stats()
        except RuntimeError:  # closed meanwhile
            return last._replace(connected=False) if last is not None else None
        self._last = LinkStatus(
            stats.batches, stats.bytes, sender.state == "connected", sender.stats.acked
        )
        return self._last

    def close(self, flush_s: float | None = None) -> None:
        """Wait up to ``flush_s`` (``cloud.stop_timeout``) for acknowledgements, then stop.

        Safe to call twice.
        """
        if flush_s is None:
            assert self._config.cloud is not None
            flush_s = self._config.cloud.stop_timeout.total_seconds()
        with self._lock:
            outbox, sender = self._outbox, self._sender
            self._outbox = self._sender = None
        if outbox is None or sender is None:
            return
        if not sender.flush(timeout=flush_s):
            stats = outbox.stats()
            log.warning(
                "cloud did not acknowledge everything before shutdown: %d batch(es), %d bytes "
                "stay in the outbox and are sent at the next start",
                stats.batches,
                stats.bytes,
            )
        sender.stop()
        try:  # the figures a stopped edge's status shows
            stats = outbox.stats()
            self._last = LinkStatus(stats.batches, stats.bytes, False, sender.stats.acked)
        finally:
            outbox.close()


class _UplinkCollector(Collector):
    """Outbox depth and connection state as Prometheus gauges."""

    def __init__(self, outbox: Outbox, sender: UplinkSender) -> None:
        self._outbox = outbox
        self._sender = sender

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._outbox.closed:
            return
        stats = self._outbox.stats()
        gauges = (
            ("edgesieve_outbox_batches", "Batches waiting for the cloud", stats.batches),
            ("edgesieve_outbox_bytes", "Bytes waiting for the cloud", stats.bytes),
            (
                "edgesieve_outbox_oldest_age_seconds",
                "Age of the oldest waiting batch",
                stats.oldest_age_s or 0.0,
            ),
            (
                "edgesieve_outbox_dropped_full",
                "Batches dropped because the outbox was full",
                stats.dropped_full,
            ),
            ("edgesieve_outbox_expired", "Batches dropped after their TTL", stats.expired),
            (
                "edgesieve_cloud_connected",
                "1 while the uplink stream is open",
                1.0 if self._sender.state == "connected" else 0.0,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
