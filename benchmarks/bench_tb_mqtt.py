"""The ThingsBoard MQTT endpoint versus the mosquitto path, into the same kind of journal.

The same load, N QoS 1 telemetry messages from K paho devices (each with at
most ``--inflight`` unacknowledged, in a spawned process that shares no GIL
with the edge), goes two ways:

(a) tb endpoint: :class:`~connectors.devices.mqtt_server.MqttServer` (username
    = token, ``v1/devices/me/telemetry``) on its own loop thread, writing
    through an :class:`~connectors.devices.ingress.Ingress` to a journal; a
    PUBACK is sent after the commit, so the devices' rate is the journal's;
(b) mosquitto path: the devices publish ``v1/devices/{id}/telemetry`` to a
    real mosquitto, and :class:`~connectors.devices.mqtt.journaled.JournaledMqtt`
    (the ingest process's client) commits each message to a journal before
    its PUBACK to the broker.

Both journals have the same settings (``--sync``). Prints, per side, the
journaled messages/s (from the first publish to the N-th commit) and the
devices' PUBACK rate (for mosquitto that is the broker's answer, before the
edge has the message), and the ratio (a)/(b) of the journaled rates.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from connectors.devices.ingress import Ingress
from connectors.devices.journal import Journal, JournalSettings
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.mqtt.client import MqttSettings
from connectors.devices.mqtt.journaled import JournaledMqtt
from connectors.devices.mqtt_server import MqttServer
from connectors.devices.registry import Device, DeviceRegistry


def token(i: int) -> str:
    return f"bench-token-{i:04d}"


def publish(port: int, devices: int, per_device: int, inflight: int, tb: bool) -> float:
    """Run in a spawned process: seconds from the first publish to the last PUBACK."""
    clients = []
    for i in range(devices):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{i}")
        if tb:
            client.username_pw_set(token(i))
        client.max_inflight_messages_set(inflight)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", port)
        client.loop_start()
        clients.append(client)
    time.sleep(0.5)  # all connected
    start = time.perf_counter()
    infos = []
    for n in range(per_device):
        body = f'{{"ts": {1763800000000 + n}, "values": {{"t": {n}.5, "p": {n}}}}}'
        for i, client in enumerate(clients):
            topic = "v1/devices/me/telemetry" if tb else f"v1/devices/dev-{i}/telemetry"
            infos.append(client.publish(topic, body, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    elapsed = time.perf_counter() - start
    for client in clients:
        client.disconnect()
        client.loop_stop()
    return elapsed


def wait_journaled(journal: Journal, n: int, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while journal.stats().messages < n:
        if time.monotonic() > deadline:
            msg = f"journal has {journal.stats().messages} of {n} messages after {timeout}s"
            raise RuntimeError(msg)
        time.sleep(0.002)
    return time.perf_counter()


def run_side(
    name: str, root: Path, args: argparse.Namespace, pool: multiprocessing.pool.Pool
) -> tuple[float, float]:
    """(journaled msg/s, PUBACK msg/s) of one side."""
    n = args.devices * args.messages
    journal = Journal(JournalSettings(root=root / name / "journal", partitions=1, sync=args.sync))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    broker = None
    ingest = None
    server = None
    try:
        if name == "tb":
            registry = DeviceRegistry(Device(f"dev-{i}", token(i)) for i in range(args.devices))
            ingress = Ingress(journal=journal)
            server = MqttServer("127.0.0.1:0", registry, ingress, max_inflight=args.server_inflight)
            asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
            port = server.port
        else:
            broker = Mosquitto(root / name / "broker").start()
            port = broker.port
            settings = MqttSettings(url=f"mqtt://127.0.0.1:{port}", client_id="bench-ingest")
            ingest = JournaledMqtt(settings, journal)
            ingest.start()
            deadline = time.monotonic() + 10
            while not ingest.ready and time.monotonic() < deadline:
                time.sleep(0.05)
        t0 = time.perf_counter()
        pending = pool.apply_async(
            publish, (port, args.devices, args.messages, args.inflight, name == "tb")
        )
        puback_s = pending.get(120)
        journaled_at = wait_journaled(journal, n)
        # the publisher's clock started ~0.5 s (its connect pause) after t0
        journaled_s = journaled_at - t0 - 0.5
        return n / journaled_s, n / puback_s
    finally:
        if server is not None:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        if ingest is not None:
            ingest.stop_taking()
        journal.close()
        if ingest is not None:
            ingest.close()
        if broker is not None:
            broker.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--messages", type=int, default=1000, help="per device")
    parser.add_argument("--inflight", type=int, default=16, help="per device")
    parser.add_argument(
        "--server-inflight", type=int, default=16, help="transports.mqtt_server.max_inflight"
    )
    parser.add_argument("--sync", default="normal", choices=["off", "normal", "full"])
    args = parser.parse_args()
    n = args.devices * args.messages
    print(
        f"{n} QoS 1 messages from {args.devices} devices, {args.inflight} in flight each, "
        f"endpoint max_inflight {args.server_inflight}, journal sync={args.sync}"
    )
    ctx = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp, ctx.Pool(1) as pool:
        for name in ("mosquitto", "tb"):
            results[name] = run_side(name, Path(tmp), args, pool)
    for name, label in (("tb", "(a) tb endpoint"), ("mosquitto", "(b) mosquitto path")):
        journaled, puback = results[name]
        print(f"{label:20s} journaled {journaled:9.0f} msg/s   device PUBACKs {puback:9.0f} msg/s")
    ratio = results["tb"][0] / results["mosquitto"][0]
    print(f"ratio (a)/(b) journaled msg/s: {ratio:.2f}")


if __name__ == "__main__":
    main()
