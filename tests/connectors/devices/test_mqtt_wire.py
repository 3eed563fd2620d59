"""MQTT packets a device server reads and writes, checked against paho's own packets."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from connectors.devices.mqtt_wire import (
    ACCEPTED,
    BAD_CREDENTIALS,
    CONNECT,
    Closed,
    connack,
    encode_length,
    encode_string,
    parse_connect,
    puback,
    publish_qos0,
    read_packet,
    read_string,
    read_varint,
    suback,
    subscription_filters,
    unsuback,
)


def paho_connect(protocol: int, *, client_id: str, keepalive: int, **options: str) -> bytes:
    """The body of the CONNECT packet paho sends (with ``username``, ``will`` when given)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if "username" in options:
        client.username_pw_set(options["username"], "ignored")
    if "will" in options:
        client.will_set(options["will"], b"gone", qos=1)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=client.connect, args=("127.0.0.1", port, keepalive))
        thread.start()
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = conn.recv(65536)
            size, at = read_varint(data, 1)
            while len(data) < at + size:
                data += conn.recv(65536)
        thread.join(5)
    sock = client.socket()
    if sock is not None:
        sock.close()
    assert data[0] >> 4 == CONNECT
    return data[at : at + size]


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5])
def test_a_paho_connect_gives_token_client_id_keepalive_past_a_will(protocol):
    body = paho_connect(protocol, client_id="dev-7", username="TOKEN", will="w/t", keepalive=30)
    connect = parse_connect(body)
    assert (connect.protocol, connect.client_id, connect.username) == ("MQTT", "dev-7", "TOKEN")
    assert connect.keepalive == 30 and connect.v5 is (protocol == paho.MQTTv5)


def test_a_connect_without_username_has_an_empty_token():
    connect = parse_connect(paho_connect(paho.MQTTv311, client_id="x", keepalive=5))
    assert connect.username == "" and connect.client_id == "x" and connect.clean


def test_another_protocol_is_reported_not_parsed_further():
    body = encode_string("MQIsdp") + bytes((3, 0x02)) + struct.pack("!H", 10)
    connect = parse_connect(body)
    assert (connect.protocol, connect.level, connect.client_id) == ("MQIsdp", 3, "")


def test_connack_311_is_its_return_code_and_5_carries_the_limits():
    assert (
        connack(BAD_CREDENTIALS, v5=False, receive_max=16, max_packet=1000) == b"\x20\x02\x00\x04"
    )
    packet = connack(ACCEPTED, v5=True, receive_max=70_000, max_packet=1000, assigned_id="e-1")
    assert packet[0] == 0x20
    body = packet[2:]
    assert body[:2] == b"\x00\x00"  # no session present, success
    props_len, at = read_varint(body, 2)
    props = body[at : at + props_len]
    assert props[:3] == b"\x21\xff\xff"  # receive maximum, capped at 65535
    assert props[3:5] == b"\x24\x01"  # maximum QoS 1
    assert props[5:10] == b"\x27" + struct.pack("!I", 1000)
    assert read_string(props, 11) == ("e-1", len(props))  # assigned client id (0x12)
    assert connack(BAD_CREDENTIALS, v5=True, receive_max=1, max_packet=1)[3] == 0x86


def test_subscribe_answers_and_acks():
    body = struct.pack("!H", 9) + encode_string("a/b") + b"\x01" + encode_string("c") + b"\x02"
    assert subscription_filters(body, v5=False) == [("a/b", 1), ("c", 2)]
    assert subscription_filters(body[:2] + b"\x00" + body[2:], v5=True) == [("a/b", 1), ("c", 2)]
    assert suback(body, b"\x01\x80", v5=False) == b"\x90\x04\x00\x09\x01\x80"
    assert suback(body, b"\x01\x80", v5=True) == b"\x90\x05\x00\x09\x00\x01\x80"
    unsub = struct.pack("!H", 9) + encode_string("a/b") + encode_string("c")
    assert unsuback(unsub, v5=False) == b"\xb0\x02\x00\x09"
    assert unsuback(unsub[:2] + b"\x00" + unsub[2:], v5=True) == b"\xb0\x05\x00\x09\x00\x00\x00"
    assert puback(513) == b"\x40\x02\x02\x01"


@given(st.text(max_size=50), st.binary(max_size=300), st.booleans())
def test_publish_qos0_reads_back(topic, payload, v5):
    packet = publish_qos0(topic, payload, v5=v5)
    assert packet[0] == 0x30
    size, at = read_varint(packet, 1)
    assert len(packet) == at + size
    got, at = read_string(packet, at)
    assert got == topic
    assert packet[at + v5 :] == payload


@given(st.integers(min_value=0, max_value=268_435_455))
def test_lengths_round_trip(size):
    assert read_varint(encode_length(size), 0) == (size, len(encode_length(size)))


def read(data: bytes, limit: int) -> tuple[int, int, bytes]:
    async def go() -> tuple[int, int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await read_packet(reader, limit)

    return asyncio.run(go())


def test_read_packet_and_its_errors():
    assert read(b"\x32\x03abc", 10) == (3, 2, b"abc")
    with pytest.raises(Closed, match="a packet of 11 bytes is over the limit of 10"):
        read(b"\x30\x0b" + bytes(11), 10)
    with pytest.raises(Closed, match="malformed remaining length"):
        read(b"\x30\xff\xff\xff\xff\x01", 10)
