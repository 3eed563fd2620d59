"""MQTT publisher: a Bytewax :class:`~bytewax.outputs.DynamicSink` over paho-mqtt 2.x.

Publishes items, e.g. alarms on ``v1/devices/{id}/alarms``, so devices and
local consumers react without the cloud. Connection settings and client
set-up are those of the MQTT source
(:class:`~connectors.devices.mqtt.MqttSettings`,
:func:`~connectors.devices.mqtt.connect_client`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.devices.mqtt import MqttSettings, check_settings, connect_client

__all__ = ["MqttSink", "MqttSinkPartition"]

logger = logging.getLogger("edgesieve.mqtt")

_CLOSE_FLUSH_S = 5.0
_CLOSE_POLL_S = 0.05


class MqttSinkPartition(StatelessSinkPartition[Any]):
    """One worker's publishing client (see :class:`MqttSink`).

    Counters for tests and metrics: ``published`` (messages handed to the
    client), ``dropped`` (messages the client refused: outgoing queue full,
    or QoS 0 while disconnected) and ``outstanding`` (handed over but not yet
    sent, or not yet acknowledged for QoS 1).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        topic: Callable[[Any], str],
        payload: Callable[[Any], bytes],
        max_queued: int,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._topic = topic
        self._payload = payload
        self._sent = threading.Condition()
        self.outstanding = 0
        self.published = 0
        self.dropped = 0
        self._client = connect_client(settings, client_id, persistent=False, max_queued=max_queued)
        self._reachable: bool | None = None
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_unreachable
        self._client.on_disconnect = self._on_unreachable
        self._client.loop_start()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._sent:
            self._reachable = not reason.is_failure
            self._sent.notify_all()

    def _on_unreachable(self, client: paho.Client, userdata: Any, *_: Any) -> None:
        with self._sent:
            self._reachable = False
            self._sent.notify_all()

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        with self._sent:
            self.outstanding -= 1
            self._sent.notify_all()

    def write_batch(self, items: list[Any]) -> None:
        """Queue each item for publishing; paho sends it once connected."""
        qos = self._settings.qos
        for item in items:
            topic = self._topic(item)
            # Counted before publishing: the acknowledgement may come at once, from
            # the network thread, which holds paho's lock while it tells us.
            with self._sent:
                self.outstanding += 1
            rc = self._client.publish(topic, self._payload(item), qos=qos).rc
            if rc == paho.MQTT_ERR_SUCCESS or (rc == paho.MQTT_ERR_NO_CONN and qos > 0):
                self.published += 1
                continue
            with self._sent:
                self.outstanding -= 1
            self.dropped += 1
            if rc == paho.MQTT_ERR_QUEUE_SIZE:
                why = "outgoing queue full while the broker is unreachable"
            elif rc == paho.MQTT_ERR_NO_CONN:
                why = "not connected to the broker, and QoS 0 messages are not queued"
            else:
                why = f"publish refused ({paho.error_string(rc)})"
            logger.warning(
                "mqtt publisher %s: %s; dropped a message for %s "
                "(it is still in the local outputs)",
                self._client_id,
                why,
                topic,
            )

    @property
    def connected(self) -> bool:
        """Whether the client is connected to the broker right now."""
        return bool(self._client.is_connected())

    def close(self) -> None:
        """Give queued messages a few seconds to leave, then disconnect.

        While the first connection is still being made it is waited for; once
        the broker is known to be unreachable, nothing is waited for.
        """
        deadline = time.monotonic() + _CLOSE_FLUSH_S
        with self._sent:
            while self.outstanding > 0 and self._reachable is not False:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._sent.wait(min(remaining, _CLOSE_POLL_S))
            unsent = self.outstanding
        if unsent > 0:
            logger.warning(
                "mqtt publisher %s: %d message(s) not delivered before shutdown",
                self._client_id,
                unsent,
            )
        self._client.disconnect()
        self._client.loop_stop()


class MqttSink(DynamicSink[Any]):
    """Publish items to an MQTT broker, e.g. alarms on ``v1/devices/{id}/alarms``.

    ``topic`` and ``payload`` map an item to its topic and bytes. Each worker has
    its own client (``{client_id}-w{worker}``, clean session) that reconnects
    with backoff; while the broker is unreachable up to ``max_queued`` messages
    wait in memory, beyond that they are dropped with a warning (local outputs
    keep them). Messages published while connected arrive in order; those
    queued while disconnected (QoS 1) may arrive after newer ones.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        topic: Callable[[Any], str],
        payload: Callable[[Any], bytes],
        max_queued: int = 10_000,
    ) -> None:
        self._settings = check_settings("MqttSink", settings)
        self._topic = topic
        self._payload = payload
        self._max_queued = max_queued

    def build(self, step_id: str, worker_index: int, worker_count: int) -> MqttSinkPartition:
        """One publishing client per worker."""
        return MqttSinkPartition(
            self._settings,
            client_id=f"{self._settings.client_id}-w{worker_index}",
            topic=self._topic,
            payload=self._payload,
            max_queued=self._max_queued,
        )
