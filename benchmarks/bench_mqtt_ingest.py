"""MQTT ingest: the journaled telemetry flow versus a bare paho client on the same backlog.

Both clients register persistent sessions on one mosquitto, then N QoS 1
telemetry messages are published once; the broker queues the same backlog for
both. (a) a bare paho client drains and only counts; (b) ``Edge(config).run()``
of the telemetry flow: the ingest process (spawned by the flow) drains the
session, commits every message to the journal before its PUBACK, and the flow
reads the journal, decodes, deadbands, windows and writes Parquet.

Two rates each: "wall" from the start (connect; for the flow also spawning the
ingest process and starting Bytewax) to the N-th message, and "drain" from
the first message to the N-th (the flow's messages counted as they leave the
journal). Prints both, and the ratios (b)/(a).

``--console`` adds (c): the same flow on its own copy of the backlog with the
live status console drawing (rich, redrawn every second, as on a terminal;
written to /dev/null), and prints (c)/(b): what the console costs the flow.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from connectors.devices.mosquitto import Mosquitto
from flows import telemetry
from flows.accounting import RECEIVED, Meter, report
from flows.api import Edge
from flows.config import parse_config
from flows.simulator import publish_telemetry, telemetry_payloads

TOPIC = "v1/devices/+/telemetry"
BARE_ID = "bench-bare"
FLOW_PREFIX = "bench-flow"
FLOW_ID = f"{FLOW_PREFIX}-telemetry"  # flows add their channel to the configured client id
CONSOLE_PREFIX = "bench-console"
CONSOLE_ID = f"{CONSOLE_PREFIX}-telemetry"


def register_session(port: int, client_id: str) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    done = threading.Event()
    client.on_subscribe = lambda *a: done.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(TOPIC, qos=1)
    if not done.wait(10):
        raise RuntimeError(f"{client_id}: subscription not acknowledged")
    client.disconnect()
    client.loop_stop()


def drain_bare(port: int, n: int, timeout: float) -> tuple[float, float]:
    """Seconds from connect to the n-th message, and from the first to the n-th."""
    count = 0
    first = 0.0
    done = threading.Event()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal count, first
        if count == 0:
            first = time.perf_counter()
        count += 1
        if count >= n:
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=BARE_ID, clean_session=False)
    client.on_message = on_message
    t0 = time.perf_counter()
    client.connect("127.0.0.1", port)
    client.loop_start()
    finished = done.wait(timeout)
    end = time.perf_counter()
    client.disconnect()
    client.loop_stop()
    if not finished:
        raise RuntimeError(f"bare client got {count}/{n} messages in {timeout}s")
    return end - t0, end - first


def drain_flow(
    port: int,
    n: int,
    data_dir: Path,
    timeout: float,
    workers: int,
    *,
    client_id: str = FLOW_PREFIX,
    console: bool = False,
) -> tuple[float, float, Meter]:
    """Seconds from ``run()`` to the n-th message received, from the first to it, the meter.

    With ``console`` the live status block is drawn while the flow runs.
    """
    config = parse_config(
        {
            "data_dir": str(data_dir),
            "transports": {"mqtt": {"url": f"mqtt://127.0.0.1:{port}", "client_id": client_id}},
        }
    )
    edge = Edge(config, name="telemetry")
    telemetry.build(edge)
    meter, stop = edge.meter, edge.stop

    marks = {"first": 0.0, "last": 0.0, "refresh_ms": 0.0}

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while meter.totals[RECEIVED] < n and time.monotonic() < deadline:
            if not marks["first"] and meter.totals[RECEIVED]:
                marks["first"] = time.perf_counter()
            time.sleep(0.002)
        marks["last"] = time.perf_counter()
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    if not console:
        t0 = time.perf_counter()
        edge.run(workers=workers)
        return marks["last"] - t0, marks["last"] - marks["first"], meter
    from rich.console import Console

    from flows.console import StatusConsole, render_block

    with open(os.devnull, "w") as sink:
        shown = Console(file=sink, force_terminal=True, width=160)
        with StatusConsole(edge, live=True, console=shown):
            t0 = time.perf_counter()
            edge.run(workers=workers)
        # one redraw's own cost: the status, the block, written to the terminal
        cpu0, rounds = time.process_time(), 50
        for _ in range(rounds):
            shown.print(render_block(edge.status()))
        marks["refresh_ms"] = (time.process_time() - cpu0) / rounds * 1000
    print(f"one console redraw (status + block): {marks['refresh_ms']:.2f} ms CPU, once a second")
    return marks["last"] - t0, marks["last"] - marks["first"], meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--console",
        action="store_true",
        help="also run the flow with the live status console and print what it costs",
    )
    args = parser.parse_args()

    per_device = max(1, args.messages // args.devices)
    payloads = telemetry_payloads(args.devices, per_device)
    n = len(payloads)
    raw = sum(len(p) for _, p in payloads)
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        register_session(broker.port, BARE_ID)
        register_session(broker.port, FLOW_ID)
        if args.console:
            register_session(broker.port, CONSOLE_ID)
        sent = publish_telemetry(broker.url, payloads, deadline_s=args.timeout)
        if sent.messages != n:
            raise RuntimeError(f"published {sent.messages}/{n}")
        print(
            f"backlog: {n} QoS 1 messages from {args.devices} devices, {raw} bytes "
            f"(published at {n / sent.seconds:,.0f} msg/s)"
        )

        bare_s, bare_drain = drain_bare(broker.port, n, args.timeout)
        flow_s, flow_drain, meter = drain_flow(
            broker.port, n, Path(tmp) / "edge", args.timeout, args.workers
        )
        if args.console:
            console_s, console_drain, console_meter = drain_flow(
                broker.port,
                n,
                Path(tmp) / "edge-console",
                args.timeout,
                args.workers,
                client_id=CONSOLE_PREFIX,
                console=True,
            )
            if report(console_meter).messages_in < n:
                raise RuntimeError(f"flow with console received {console_meter.totals}/{n}")

    rep = report(meter)
    if rep.messages_in < n:
        raise RuntimeError(f"flow received {rep.messages_in}/{n} messages")
    bare_rate, flow_rate = n / bare_s, n / flow_s
    bare_drain_rate, flow_drain_rate = n / bare_drain, n / flow_drain
    print(
        f"(a) bare paho, count only:          wall {bare_rate:>8,.0f} msg/s ({bare_s:.2f} s)"
        f"  drain {bare_drain_rate:>8,.0f} msg/s"
    )
    print(
        f"(b) journaled flow to Parquet:      wall {flow_rate:>8,.0f} msg/s ({flow_s:.2f} s)"
        f"  drain {flow_drain_rate:>8,.0f} msg/s  ({args.workers} worker(s))"
    )
    print(
        f"ratio (b)/(a): wall {flow_rate / bare_rate:.2f}  drain "
        f"{flow_drain_rate / bare_drain_rate:.2f}   (target >= 0.8)"
    )
    if args.console:
        console_rate, console_drain_rate = n / console_s, n / console_drain
        print(
            f"(c) (b) with the live status console: wall {console_rate:>8,.0f} msg/s "
            f"({console_s:.2f} s)  drain {console_drain_rate:>8,.0f} msg/s"
        )
        print(
            f"ratio (c)/(b): wall {console_rate / flow_rate:.3f}  drain "
            f"{console_drain_rate / flow_drain_rate:.3f}   (target >= 0.98)"
        )
    print(
        f"flow output: {rep.stages.get('telemetry_points', 0)} points, "
        f"{rep.stages.get('telemetry_summary', 0)} summaries, "
        f"reduction raw/output bytes {rep.ratio or 0:.1f}:1"
    )


if __name__ == "__main__":
    main()
