"""A gateway's message as device messages (``route``), without a connection.

The endpoint's own tests (test_mqtt_server.py) send the same messages over MQTT.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from connectors.codecs.decode import REFUSED_PREFIX
from connectors.devices.mqtt_gateway import Part, route
from connectors.devices.registry import Device

GATEWAY = Device("gw-1", "token-gw", gateway=("line-*",))
TRANSPORT = "gateway:gw-1"


def test_each_device_part_is_a_message_of_that_device_marked_with_the_gateway() -> None:
    payload = json.dumps({"line-a": [{"ts": 1, "values": {"t": 2}}], "line-b": {"v": 1}})
    routed = route(GATEWAY, "telemetry", payload.encode(), dup=True)
    assert routed.event is None
    assert routed.parts == [
        Part("line-a", "telemetry", TRANSPORT, b'[{"ts":1,"values":{"t":2}}]', True),
        Part("line-b", "telemetry", TRANSPORT, b'{"v":1}', True),
    ]
    attributes = route(GATEWAY, "attributes", b'{"line-a": {"fw": "1.2"}}')
    assert attributes.parts == [Part("line-a", "attributes", TRANSPORT, b'{"fw":"1.2"}')]


def test_a_device_the_gateway_may_not_speak_for_is_refused_and_the_rest_is_kept() -> None:
    payload = b'{"line-a": {"v": 1}, "boiler": {"v": 2}, "bad name!": {"v": 3}}'
    kept, boiler, bad = route(GATEWAY, "telemetry", payload, dup=True).parts
    assert kept == Part("line-a", "telemetry", TRANSPORT, b'{"v":1}', True)
    assert boiler.device == "gw-1"
    assert boiler.payload == b'{"boiler":{"v":2}}'
    assert not boiler.redelivered  # stored as a dead letter, never matched as a redelivery
    assert boiler.channel == REFUSED_PREFIX + (
        "gateway 'gw-1' may not speak for device 'boiler'; its devices.yaml patterns are "
        "[line-*]; hint: add a pattern matching it"
    )
    assert bad.channel == REFUSED_PREFIX + (
        "gateway 'gw-1' sent device name 'bad name!', which is not a valid device id "
        "(1-128 letters, digits, '.', '_', ':' or '-')"
    )


def test_connect_and_disconnect_are_logged_not_kept() -> None:
    assert route(GATEWAY, "connect", b'{"device": "line-a", "type": "default"}') == (
        [],
        "gateway gw-1: connect line-a",
    )
    assert route(GATEWAY, "disconnect", b'{"device": "line-a"}').event == (
        "gateway gw-1: disconnect line-a"
    )
    (refused,) = route(GATEWAY, "connect", b'{"device": "boiler"}').parts
    assert refused.channel.startswith(REFUSED_PREFIX + "gateway 'gw-1' may not speak for")


def test_payloads_of_the_wrong_shape_are_refused_whole_with_the_reason() -> None:
    cases = {
        ("connect", b"[1]"): 'v1/gateway/connect: expected a JSON object with a "device" name, '
        'got list; e.g. {"device": "Dev A", "type": "default"}',
        ("telemetry", b"{oops"): "v1/gateway/telemetry: expected a JSON object of device "
        "names, got invalid JSON (Expecting property name enclosed in double quotes at "
        'character 1); e.g. {"Dev A": [{"ts": 1763800000000, "values": {"temp": 21.5}}]}',
        ("disconnect", b"\xff"): 'v1/gateway/disconnect: expected a JSON object with a "device" '
        'name, got invalid JSON (not UTF-8: byte 0xff at 0); e.g. {"device": "Dev A", '
        '"type": "default"}',
        ("rpc", b"{}"): "topic 'v1/gateway/rpc' is not part of the gateway API; use "
        "v1/gateway/connect, disconnect, telemetry or attributes",
    }
    for (what, payload), reason in cases.items():
        (part,) = route(GATEWAY, what, payload, dup=True).parts
        assert part == Part("gw-1", REFUSED_PREFIX + reason, TRANSPORT, payload)


names = st.one_of(st.from_regex(r"line-[a-z0-9]{1,8}", fullmatch=True), st.text(max_size=12))
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@given(st.dictionaries(names, values, max_size=6), st.booleans())
def test_every_part_of_a_gateway_message_is_kept_once_under_a_device_or_refused(
    data: dict[str, object], dup: bool
) -> None:
    parts = route(GATEWAY, "telemetry", json.dumps(data).encode(), dup=dup).parts
    assert len(parts) == len(data)
    for (name, value), part in zip(data.items(), parts, strict=True):
        assert part.transport == TRANSPORT
        if part.channel == "telemetry":
            assert part.device == name and GATEWAY.speaks_for(name)
            assert json.loads(part.payload) == value
            assert part.redelivered is dup
        else:
            assert part.channel.startswith(REFUSED_PREFIX) and part.device == "gw-1"
            assert json.loads(part.payload) == {name: value}
            assert not part.redelivered
