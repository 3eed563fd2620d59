"""The device API's answers without a connection (test_mqtt_server.py asks them over MQTT)."""

from __future__ import annotations

import json

import pytest

from connectors.devices.mqtt_device_api import REFUSED, TOPIC_CHANNELS, granted_qos, rpc_answer
from connectors.devices.registry import Device

DEVICE = Device("pump-1", "token-1")
GATEWAY = Device("gw-1", "token-gw", gateway=("line-*",))


@pytest.mark.parametrize(
    ("device", "topic", "qos", "code"),
    [
        (DEVICE, "v1/devices/me/attributes", 1, 1),
        (DEVICE, "v1/devices/me/rpc/request/+", 2, 1),  # QoS 2 is granted as 1
        (DEVICE, "v1/devices/me/attributes/response/+", 0, 0),
        (DEVICE, "v1/gateway/rpc", 1, REFUSED),  # a device is no gateway
        (GATEWAY, "v1/gateway/rpc", 1, 1),
        (GATEWAY, "v1/devices/me/rpc/response/+", 1, 1),
        (DEVICE, "#", 0, REFUSED),
    ],
)
def test_subscriptions_are_granted_per_the_api(device, topic, qos, code):
    assert granted_qos(device, topic, qos) == code


def test_session_limits_in_thingsboards_shape_and_other_methods_refused():
    ask = json.dumps({"method": "getSessionLimits", "params": {}}).encode()
    limits = rpc_answer(DEVICE, ask, max_payload_bytes=65536, max_inflight=16)
    empty = {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}
    assert limits == {"maxPayloadSize": 65536, "maxInflightMessages": 16, "rateLimits": empty}
    gateway = rpc_answer(GATEWAY, ask, max_payload_bytes=1, max_inflight=2)
    assert gateway["gatewayRateLimits"] == empty
    for payload, method in ((b'{"method": "reboot"}', "'reboot'"), (b"not json", "'None'")):
        answer = rpc_answer(DEVICE, payload, max_payload_bytes=1, max_inflight=1)
        assert answer == {
            "error": f"RPC method {method} is not supported by the edge; "
            "only getSessionLimits is answered"
        }


def test_each_data_topic_has_its_channel():
    assert TOPIC_CHANNELS == {
        "v1/devices/me/telemetry": "telemetry",
        "v1/devices/me/attributes": "attributes",
        "v1/devices/me/logs": "logs",
    }
