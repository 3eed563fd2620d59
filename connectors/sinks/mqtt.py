"""MQTT publisher: a Bytewax :class:`~bytewax.outputs.FixedPartitionedSink` over paho-mqtt 2.x.

Publishes items, e.g. alarms on ``v1/devices/{id}/alarms``, so devices and
local consumers react without the cloud. Connection settings and client
set-up are those of the MQTT source
(:class:`~connectors.devices.mqtt.MqttSettings`,
:func:`~connectors.devices.mqtt.connect_client`).

At-least-once with QoS 1 under Bytewax recovery: a partition's snapshot is
the list of messages handed to the client but not yet acknowledged by the
broker (``{"version": 1, "pending": [[topic, payload, qos], ...]}``); a
partition resumed from it publishes them again first, and Bytewax replays
everything after the snapshot. A message may therefore arrive twice (a crash
after the broker's PUBACK but before the next snapshot, or a replay); alarm
payloads carry a stable ``id`` (:func:`alarm_id`) so consumers can drop the
second copy. QoS 0 messages are never kept (at most once, as QoS 0 says).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from connectors.devices.mqtt import MqttSettings, check_settings, connect_client

__all__ = ["MqttSink", "MqttSinkPartition", "MqttSinkState", "alarm_id", "alarm_payload"]

logger = logging.getLogger("edgesieve.mqtt")

_CLOSE_FLUSH_S = 5.0
_CLOSE_POLL_S = 0.05
_STATE_VERSION = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_PARTITIONS = 4

MqttSinkState = dict[str, Any]
"""A partition's snapshot: ``{"version": 1, "pending": [[topic, payload, qos], ...]}``."""


def alarm_id(device: str, key: str, rule: str, ts: datetime, state: str) -> str:
    """A stable id for one alarm transition: the same in every run and every replay.

    Hex SHA-256 (first 32 digits) over the device, the watched key (e.g.
    ``pump-7/x``), the rule, ``ts`` as Unix microseconds and the state, each
    preceded by its length. ``key`` is part of it because one rule on several
    axes of a device raises one alarm per axis at the same ``ts``.
    """
    if not isinstance(ts, datetime) or ts.utcoffset() is None:
        msg = f"alarm_id: ts must be a timezone-aware datetime; got {ts!r}"
        raise ValueError(msg)
    delta = ts - _EPOCH
    digest = hashlib.sha256()
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    for part in (device, key, rule, str(micros), state):
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:32]


def alarm_payload(alarm: Any) -> bytes:
    """The JSON published on ``v1/devices/{id}/alarms`` for an alarm row (with its ``id``)."""
    return json.dumps(
        {
            "id": alarm_id(alarm.device, alarm.key, alarm.rule, alarm.ts, alarm.state),
            "ts": int(alarm.ts.timestamp() * 1000),
            "rule": alarm.rule,
            "state": alarm.state,
            "severity": alarm.severity,
            "value": alarm.value,
            "key": alarm.key,
        }
    ).encode()


class MqttSinkPartition(StatefulSinkPartition[Any, MqttSinkState]):
    """One partition's publishing client (see :class:`MqttSink`).

    Counters for tests and metrics: ``published`` (messages handed to the
    client), ``dropped`` (messages the client refused: outgoing queue full,
    or QoS 0 while disconnected), ``outstanding`` (handed over but not yet
    sent, or not yet acknowledged for QoS 1) and ``resumed`` (messages
    published again from the snapshot).
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        topic: Callable[[Any], str],
        payload: Callable[[Any], bytes],
        max_queued: int,
        resume_state: MqttSinkState | None = None,
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._topic = topic
        self._payload = payload
        self._sent = threading.Condition()
        self.outstanding = 0
        self.published = 0
        self.dropped = 0
        self.resumed = 0
        self._pending: dict[int, tuple[str, bytes, int]] = {}
        self._acked_early: set[int] = set()
        self._unkept: set[int] = set()  # QoS 0 messages not yet sent
        self._client = connect_client(settings, client_id, persistent=False, max_queued=max_queued)
        self._reachable: bool | None = None
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_unreachable
        self._client.on_disconnect = self._on_disconnect
        self._client.loop_start()
        if resume_state is not None:
            self._resume(resume_state)

    def _resume(self, state: MqttSinkState) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            msg = (
                f"mqtt publisher {self._client_id}: cannot resume from snapshot {state!r:.80}; "
                f"this edgesieve writes version {_STATE_VERSION}. Hint: start with a fresh "
                "recovery directory"
            )
            raise ValueError(msg)
        pending = [(str(t), bytes(p), int(q)) for t, p, q in state["pending"]]
        if pending:
            logger.info(
                "mqtt publisher %s: publishing %d message(s) again that the broker had not "
                "acknowledged at the snapshot",
                self._client_id,
                len(pending),
            )
        self.resumed = len(pending)
        for topic, payload, qos in pending:
            self._publish(topic, payload, qos)

    def snapshot(self) -> MqttSinkState | None:
        """The QoS >= 1 messages not yet acknowledged by the broker, to publish again on resume."""
        with self._sent:
            pending = [list(message) for message in self._pending.values()]
        if not pending:
            return None
        return {"version": _STATE_VERSION, "pending": pending}

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

    def _on_disconnect(self, client: paho.Client, userdata: Any, *_: Any) -> None:
        # Reconnecting: whether the broker is reachable is known again after the next attempt
        # (a dropped connection, e.g. one the broker closed on a protocol error, is retried).
        with self._sent:
            self._reachable = None
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
            if self._pending.pop(mid, None) is None and mid not in self._unkept:
                self._acked_early.add(mid)
            self._unkept.discard(mid)
            self._sent.notify_all()

    def write_batch(self, items: list[Any]) -> None:
        """Queue each item for publishing; paho sends it once connected."""
        qos = self._settings.qos
        for item in items:
            self._publish(self._topic(item), self._payload(item), qos)

    def _publish(self, topic: str, payload: bytes, qos: int) -> None:
        # Counted before publishing: the acknowledgement may come at once, from
        # the network thread, which holds paho's lock while it tells us (so our
        # lock is not held around publish(); an early ack is matched afterwards).
        with self._sent:
            self.outstanding += 1
        info = self._client.publish(topic, payload, qos=qos)
        rc = info.rc
        if rc == paho.MQTT_ERR_SUCCESS or (rc == paho.MQTT_ERR_NO_CONN and qos > 0):
            self.published += 1
            if qos > 0:
                with self._sent:
                    if info.mid in self._acked_early:
                        self._acked_early.discard(info.mid)
                    else:
                        self._pending[info.mid] = (topic, payload, qos)
            else:
                with self._sent:
                    if info.mid in self._acked_early:
                        self._acked_early.discard(info.mid)
                    else:
                        self._unkept.add(info.mid)
            return
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
            "mqtt publisher %s: %s; dropped a message for %s (it is still in the local outputs)",
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


class MqttSink(FixedPartitionedSink[Any, MqttSinkState]):
    """Publish items to an MQTT broker, e.g. alarms on ``v1/devices/{id}/alarms``.

    Items are ``(key, value)`` 2-tuples; the key (e.g. the device id) picks one
    of ``partitions`` partitions. ``topic`` and ``payload`` map a value to its
    topic and bytes (:func:`alarm_payload` for alarm rows). Each partition has
    its own client (``{client_id}-p{n}``, clean session) that reconnects with
    backoff; while the broker is unreachable up to ``max_queued`` messages wait
    in memory, beyond that they are dropped with a warning (local outputs keep
    them). Messages of one key published while connected arrive in order;
    those queued while disconnected (QoS 1) may arrive after newer ones. See
    the module docstring for at-least-once delivery across a crash.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        topic: Callable[[Any], str],
        payload: Callable[[Any], bytes],
        max_queued: int = 10_000,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        self._settings = check_settings("MqttSink", settings)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            msg = f"MqttSink: partitions must be an int >= 1; got {partitions!r}. Hint: 4"
            raise ValueError(msg)
        self._topic = topic
        self._payload = payload
        self._max_queued = max_queued
        self.partitions = partitions

    def list_parts(self) -> list[str]:
        """Every partition, on every worker: Bytewax gives each one to one worker."""
        return [f"p{i}" for i in range(self.partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: MqttSinkState | None
    ) -> MqttSinkPartition:
        """One publishing client per partition, resumed with its unacknowledged messages."""
        return MqttSinkPartition(
            self._settings,
            client_id=f"{self._settings.client_id}-{for_part}",
            topic=self._topic,
            payload=self._payload,
            max_queued=self._max_queued,
            resume_state=resume_state,
        )
