"""The ThingsBoard SDK test client itself: its virtualenv, its scripts, its MQTT on a plain broker.

The SDK tests against the edge (tests/flows/test_thingsboard.py) rely on this:
the SDK's own modules import from ``.venv-tb`` without the repository's paho,
``TBDeviceMqttClient`` publishes ThingsBoard's topics to a real mosquitto, and a
script that fails, hangs or cannot be set up fails the test with its log.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import tests.thingsboard as tb
from connectors.devices.mosquitto import Mosquitto
from tests.thingsboard import SDK_VERSION, TBSdk

IMPORTS = """
import importlib.metadata, paho, tb_device_http, tb_device_mqtt, tb_gateway_mqtt
say({
    "version": importlib.metadata.version("tb-mqtt-client"),
    "paho": paho.__file__,
    "sdk": tb_device_mqtt.__file__,
    "classes": [c.__name__ for c in (tb_device_mqtt.TBDeviceMqttClient,
                tb_device_http.TBHTTPDevice, tb_gateway_mqtt.TBGatewayMqttClient)],
})
"""


def test_the_sdk_imports_from_its_own_virtualenv_with_its_own_paho(tb_sdk: TBSdk) -> None:
    found = tb_sdk.run(IMPORTS)
    assert found["version"] == SDK_VERSION
    assert found["classes"] == ["TBDeviceMqttClient", "TBHTTPDevice", "TBGatewayMqttClient"]
    for module in (found["paho"], found["sdk"]):
        assert Path(module).is_relative_to(tb.VENV), module  # not the edge's paho-mqtt


DEVICE_MQTT = """
from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo
client = TBDeviceMqttClient(params["host"], port=params["port"], username=params["token"])
limits, codes = session_limits(client), connack_codes(client)
client.connect(timeout=10)
wait_until(client.is_connected, "CONNACK")
say({"connected": True})
wait_until(lambda: limits, "the getSessionLimits answer")
sent = published(client.send_telemetry({"ts": params["ts"], "values": {"temp": 21.5}}))
client.disconnect()
client.stop()
say({"limits": limits, "codes": codes, "sent": sent, "success": TBPublishInfo.TB_ERR_SUCCESS})
"""

SESSION_LIMITS = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {
        "messages": "200:1",
        "telemetryMessages": "100:1",
        "telemetryDataPoints": "500:1",
    },
}


def test_the_device_client_publishes_thingsboard_topics_to_a_real_broker(
    tb_sdk: TBSdk, mosquitto: Mosquitto
) -> None:
    # a plain broker stands in for ThingsBoard: the test's paho client sees what the SDK
    # publishes and answers its getSessionLimits request the way ThingsBoard does
    seen: queue.Queue[paho.MQTTMessage] = queue.Queue()
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="tb-sdk-listener")
    subscribed = threading.Event()
    listener.on_message = lambda _c, _u, msg: seen.put(msg)
    listener.on_subscribe = lambda *_: subscribed.set()
    listener.connect(mosquitto.host, mosquitto.port)
    listener.subscribe("v1/devices/me/#", qos=1)
    listener.loop_start()
    ts = 1_763_800_000_000
    try:
        assert subscribed.wait(10), "the listener's SUBACK"
        script = tb_sdk.start(
            DEVICE_MQTT, host=mosquitto.host, port=mosquitto.port, token="tok-A", ts=ts
        )
        assert script.next() == {"connected": True}
        request = seen.get(timeout=15)
        assert request.topic.startswith("v1/devices/me/rpc/request/"), request.topic
        assert json.loads(request.payload) == {
            "method": "getSessionLimits",
            "params": {"timeout": 5000},
        }
        rpc_id = request.topic.rsplit("/", 1)[1]
        listener.publish(f"v1/devices/me/rpc/response/{rpc_id}", json.dumps(SESSION_LIMITS), qos=1)
        while (msg := seen.get(timeout=15)).topic != "v1/devices/me/telemetry":
            pass  # the listener also hears its own response
        # the SDK sends even one reading as a JSON list of {ts, values}
        assert json.loads(msg.payload) == [{"ts": ts, "values": {"temp": 21.5}}]
        result = script.finish()
    finally:
        listener.loop_stop()
        listener.disconnect()
    assert result["limits"] == [SESSION_LIMITS]
    assert result["codes"] == [0]
    assert result["sent"] == {"rc": result["success"], "acked": True}


def test_a_script_that_fails_fails_the_test_with_its_log(tb_sdk: TBSdk) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"exited with status 1; its log:\n(.|\n)*boom"):
        tb_sdk.run("raise SystemExit('boom')")


def test_a_script_that_hangs_fails_the_test_and_is_killed(tb_sdk: TBSdk) -> None:
    script = tb_sdk.start("hear()")
    with pytest.raises(pytest.fail.Exception, match="did not end within 0.5s"):
        script.finish(timeout=0.5)
    assert script.proc.poll() is not None


def test_a_script_that_ends_before_saying_what_the_test_waits_for_fails_the_test(
    tb_sdk: TBSdk,
) -> None:
    script = tb_sdk.start("say(1)")
    assert script.next() == 1
    with pytest.raises(pytest.fail.Exception, match=r"ended \(exit 0\) before saying"):
        script.next(timeout=10)


def test_a_virtualenv_that_cannot_be_created_fails_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(tb, "VENV", blocker / ".venv-tb")
    with pytest.raises(
        pytest.fail.Exception,
        match=r"cannot create the ThingsBoard SDK virtualenv .*: python -m venv failed \(exit 1\): "
        r".*; hint: the tests install tb-mqtt-client==1\.13\.14",
    ):
        tb.sdk_venv()
