"""ThingsBoard's device API on the edge's MQTT endpoint: its topics, and the answers to requests.

- Subscriptions to ``v1/devices/me/attributes``,
  ``v1/devices/me/attributes/response/+``, ``v1/devices/me/rpc/request/+``,
  ``v1/devices/me/rpc/response/+`` (and a gateway's ``v1/gateway/attributes``,
  ``v1/gateway/attributes/response``, ``v1/gateway/rpc``) are granted at QoS 0
  or 1; any other filter gets the failure code 0x80. The edge sends no shared
  attribute updates or server-side RPCs (it has no cloud-side device state).
- RPC ``v1/devices/me/rpc/request/<id>`` with ``{"method": "getSessionLimits"}``
  is answered on ``v1/devices/me/rpc/response/<id>`` with the edge's limits in
  ThingsBoard's shape (``maxPayloadSize``, ``maxInflightMessages``,
  ``rateLimits`` with empty strings: the edge does not rate-limit, it pushes
  back); any other method is answered ``{"error": "..."}``. An attribute
  request ``v1/devices/me/attributes/request/<id>`` is answered ``{}`` (the
  edge keeps no server-side or shared attributes).
"""

from __future__ import annotations

import json
from typing import Final

from connectors.codecs.attributes_json import ATTRIBUTES
from connectors.devices.mqtt_gateway import GATEWAY_FILTERS
from connectors.devices.registry import Device
from operators.records import LOGS, TELEMETRY

__all__ = ["granted_qos", "rpc_answer"]

TELEMETRY_TOPIC: Final = "v1/devices/me/telemetry"
ATTRIBUTES_TOPIC: Final = "v1/devices/me/attributes"
LOGS_TOPIC: Final = "v1/devices/me/logs"
RPC_REQUEST: Final = "v1/devices/me/rpc/request/"
RPC_RESPONSE: Final = "v1/devices/me/rpc/response/"
ATTRIBUTES_REQUEST: Final = "v1/devices/me/attributes/request/"
ATTRIBUTES_RESPONSE: Final = "v1/devices/me/attributes/response/"
TOPIC_CHANNELS: Final = {
    TELEMETRY_TOPIC: TELEMETRY,
    ATTRIBUTES_TOPIC: ATTRIBUTES,
    LOGS_TOPIC: LOGS,
}
"""The device channel of what a device publishes on each data topic."""
DEVICE_FILTERS: Final = frozenset(
    {
        ATTRIBUTES_TOPIC,
        ATTRIBUTES_RESPONSE + "+",
        RPC_REQUEST + "+",
        RPC_RESPONSE + "+",
    }
)
"""The filters a device may subscribe to."""
API_HINT: Final = f"publish to {TELEMETRY_TOPIC}, {ATTRIBUTES_TOPIC} or {LOGS_TOPIC}"
REFUSED: Final = 0x80
"""SUBACK's failure code."""


def granted_qos(device: Device, topic: str, qos: int) -> int:
    """The SUBACK code of ``device``'s subscription to ``topic`` at ``qos``."""
    granted = topic in DEVICE_FILTERS or (device.gateway is not None and topic in GATEWAY_FILTERS)
    return min(qos, 1) if granted else REFUSED


def rpc_answer(
    device: Device, payload: bytes, *, max_payload_bytes: int, max_inflight: int
) -> dict[str, object]:
    """The answer to ``device``'s RPC request ``payload``: session limits, or an error."""
    try:
        method = json.loads(payload).get("method")
    except (ValueError, AttributeError):
        method = None
    if method != "getSessionLimits":
        return {
            "error": f"RPC method {str(method)[:60]!r} is not supported by the edge; "
            "only getSessionLimits is answered"
        }
    no_limits = {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}
    limits: dict[str, object] = {
        "maxPayloadSize": max_payload_bytes,
        "maxInflightMessages": max_inflight,
        "rateLimits": no_limits,
    }
    if device.gateway is not None:
        limits["gatewayRateLimits"] = dict(no_limits)
    return limits
