"""Soak: the whole edge under mixed good and hostile traffic for minutes; memory, losses, latency.

Runs, all on loopback: a mosquitto broker, the reference cloud receiver
(``edgesieve cloud``, its own process) and ``edgesieve run flows.edge`` (the
flow's process and its ingest child, one process group) with MQTT, HTTP and
CoAP devices configured and the cloud uplink on.

Good devices stream numbered readings (``{"seq": n}``) at a fixed rate: MQTT
(QoS 1), HTTP (keep-alive) and CoAP (confirmable). A device counts a reading
as accepted when it got PUBACK (the broker holds it for the edge's persistent
session), 200 or 2.04. Every reading moves the deadband (tolerance 0.5), so
``telemetry_points`` holds each processed reading once.

Hostile traffic runs at the same time from other registered devices and from
nobody at all, one action every ``--hostile-every`` seconds, cycling through:
malformed JSON, NaN, a body over ``max_payload_bytes``, an unknown token, a
corrupt ``Content-Encoding: deflate`` body, a burst of slow-loris connections
dropped mid-body, a CoAP block-wise upload abandoned after its first block,
an MQTT message with thousands of new keys, malformed MQTT payloads, readings
with timestamps far in the past, and silent or saturated EVB1 vibration
blocks.

Every ``--sample-every`` seconds the resident memory of the edge's process
group is sampled. At the end the devices stop, the edge is stopped with
SIGTERM and the outputs are counted: every accepted good reading must be in
Parquet, in ``edge.duckdb`` and in the cloud exactly once.

Prints RSS over time (and its peak), the answers each kind of traffic got,
the good requests' latency (p50/p99 per transport), and the readings lost or
doubled per output. Exits 1 when any accepted reading is lost or doubled.

    python -m benchmarks.soak                 # 10 minutes
    python -m benchmarks.soak --seconds 60    # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import paho.mqtt.client as paho
from aiocoap import POST, Context, Message
from paho.mqtt.enums import CallbackAPIVersion

from connectors.codecs.evb1 import encode_evb1
from connectors.devices.loopback import free_port
from connectors.devices.mosquitto import Mosquitto

ROOT = Path(__file__).resolve().parents[1]
CLOUD_KEY = "edge-01"
GOOD_MQTT, GOOD_HTTP, GOOD_COAP = "good-mq", "good-http", "good-coap"
HOSTILE = "hostile"
"""The registered device the hostile traffic comes from (its token is valid)."""
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 180.0


# --- the devices --------------------------------------------------------------------------------


class Good:
    """Good devices streaming numbered readings; each records what it was told was accepted."""

    def __init__(
        self, tokens: dict[str, str], ports: dict[str, int], rate: float, seconds: float
    ) -> None:
        self.tokens, self.ports = tokens, ports
        self.period, self.seconds = 1.0 / rate, seconds
        self.accepted: dict[str, set[int]] = {}
        self.answers: dict[str, Counter[str]] = {}
        self.latency_ms: dict[str, list[float]] = {"http": [], "coap": [], "mqtt": []}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, count: int) -> Good:
        for i in range(count):
            for kind, target in (
                (GOOD_MQTT, self._mqtt),
                (GOOD_HTTP, self._http),
                (GOOD_COAP, lambda d: asyncio.run(self._coap(d))),
            ):
                device = f"{kind}-{i}"
                self.accepted[device] = set()
                self.answers[device] = Counter()
                thread = threading.Thread(target=target, args=(device,), daemon=True)
                self._threads.append(thread)
                thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _paced(self) -> Callable[[], bool]:
        """A pacer: sleeps to the next tick; False once the run is over."""
        start = time.monotonic()
        end = start + self.seconds
        tick = [start]

        def next_tick() -> bool:
            tick[0] += self.period
            delay = tick[0] - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return False
            return not self._stop.is_set() and time.monotonic() < end

        return next_tick

    @staticmethod
    def body(seq: int) -> bytes:
        return json.dumps({"seq": seq}).encode()

    def _mqtt(self, device: str) -> None:
        inflight: dict[int, tuple[int, float]] = {}
        lock = threading.Lock()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device)
        client.username_pw_set(device, self.tokens[device])

        def on_publish(client, userdata, mid, reason, properties) -> None:  # noqa: ANN001
            with lock:
                sent = inflight.pop(mid, None)
            if sent is not None:
                self.accepted[device].add(sent[0])
                self.latency_ms["mqtt"].append((time.perf_counter() - sent[1]) * 1000)
                self.answers[device]["PUBACK"] += 1

        client.on_publish = on_publish
        client.connect("127.0.0.1", self.ports["mqtt"])
        client.loop_start()
        seq, more = 0, self._paced()
        while more():
            with lock:
                info = client.publish(f"v1/devices/{device}/telemetry", self.body(seq), qos=1)
                inflight[info.mid] = (seq, time.perf_counter())
            seq += 1
        deadline = time.monotonic() + 30
        while inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        client.loop_stop()
        client.disconnect()

    def _http(self, device: str) -> None:
        path = f"/api/v1/{self.tokens[device]}/telemetry"
        conn: http.client.HTTPConnection | None = None
        seq, more = 0, self._paced()
        while more():
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=10)
            start = time.perf_counter()
            try:
                conn.request("POST", path, self.body(seq))
                response = conn.getresponse()
                response.read()
                answer = str(response.status)
            except OSError as exc:
                answer = type(exc).__name__
                conn.close()
                conn = None
            else:
                self.latency_ms["http"].append((time.perf_counter() - start) * 1000)
                if answer == "200":
                    self.accepted[device].add(seq)
            self.answers[device][answer] += 1
            seq += 1
        if conn is not None:
            conn.close()

    async def _coap(self, device: str) -> None:
        context = await Context.create_client_context()
        uri = f"coap://127.0.0.1:{self.ports['coap']}/api/v1/{self.tokens[device]}/telemetry"
        seq, more = 0, self._paced()
        try:
            while await asyncio.to_thread(more):
                start = time.perf_counter()
                try:
                    request = context.request(Message(code=POST, uri=uri, payload=self.body(seq)))
                    response = await asyncio.wait_for(request.response, 10)
                    answer = response.code.dotted
                except Exception as exc:  # noqa: BLE001 - counted by kind
                    answer = type(exc).__name__
                else:
                    self.latency_ms["coap"].append((time.perf_counter() - start) * 1000)
                    if answer == "2.04":
                        self.accepted[device].add(seq)
                self.answers[device][answer] += 1
                seq += 1
        finally:
            await context.shutdown()


def _coap_block1_first(token: str, message_id: int) -> bytes:
    """A confirmable POST with only block 0 (64 bytes, more to follow) of a telemetry body."""
    options: list[tuple[int, bytes]] = [
        (11, b"api"),
        (11, b"v1"),
        (11, token.encode()),
        (11, b"telemetry"),
        (27, bytes([0x0A])),  # Block1: num 0, M=1, SZX=2 (64 bytes)
    ]
    out = bytearray([0x40 | 2, 0x02]) + struct.pack(">H", message_id) + b"\x07\x07"  # TKL 2
    last = 0
    for number, value in options:
        delta, length = number - last, len(value)
        last = number
        ext = b""
        if delta >= 13:
            ext, delta = bytes([delta - 13]), 13
        lext = b""
        if length >= 13:
            lext, length = bytes([length - 13]), 13
        out += bytes([(delta << 4) | length]) + ext + lext + value
    return bytes(out) + b"\xff" + b'{"seq": 1, "pad": "' + b"x" * 45


class Hostile:
    """Hostile actions, one every ``every`` seconds, cycling; counts the answers per action."""

    def __init__(self, tokens: dict[str, str], ports: dict[str, int], every: float) -> None:
        self.token, self.ports, self.every = tokens[HOSTILE], ports, every
        self.answers: dict[str, Counter[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id=HOSTILE)
        self._mqtt.username_pw_set(HOSTILE, self.token)
        self._rng = random.Random(11)
        self._message_id = 1

    def start(self) -> Hostile:
        self._mqtt.connect("127.0.0.1", self.ports["mqtt"])
        self._mqtt.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self._mqtt.loop_stop()
        self._mqtt.disconnect()

    def _run(self) -> None:
        actions = [
            ("http malformed json", lambda: self._post(b'{"t": 21.5,', "telemetry")),
            ("http NaN", lambda: self._post(b'{"t": NaN}', "telemetry")),
            ("http oversized", lambda: self._post(b"[" + b"1," * 600_000 + b"1]", "telemetry")),
            ("http unknown token", lambda: self._post(b'{"t": 1}', "telemetry", token="nobody")),
            (
                "http corrupt deflate",
                lambda: self._post(b"\x78\x9c garbage", "telemetry", encoding="deflate"),
            ),
            ("http slow-loris x50", lambda: self._slow_loris(50)),
            ("coap abandoned block-wise", self._coap_abandoned),
            ("mqtt 5000 new keys", self._mqtt_keys),
            ("mqtt malformed", lambda: self._publish(b"\x00\xff not json")),
            ("http ts far in the past", self._late),
            ("http silent EVB1 block", lambda: self._post(self._block(0.0), "vibration")),
            ("http saturated EVB1 block", lambda: self._post(self._block(3.0e38), "vibration")),
        ]
        i = 0
        while not self._stop.wait(self.every):
            name, action = actions[i % len(actions)]
            i += 1
            try:
                answer = action()
            except Exception as exc:  # noqa: BLE001 - counted by kind
                answer = type(exc).__name__
            self.answers.setdefault(name, Counter())[answer] += 1

    def _post(
        self, body: bytes, channel: str, *, token: str | None = None, encoding: str | None = None
    ) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports["http"], timeout=10)
        try:
            headers = {"Content-Encoding": encoding} if encoding else {}
            conn.request("POST", f"/api/v1/{token or self.token}/{channel}", body, headers)
            response = conn.getresponse()
            response.read()
            return str(response.status)
        finally:
            conn.close()

    def _slow_loris(self, count: int) -> str:
        sockets = []
        try:
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", self.ports["http"]), timeout=5)
                s.sendall(
                    f"POST /api/v1/{self.token}/telemetry HTTP/1.1\r\nHost: x\r\n"
                    'Content-Length: 1000\r\n\r\n{"t": '.encode()
                )
                sockets.append(s)
            time.sleep(1.0)
        finally:
            for s in sockets:
                s.close()
        return "dropped"

    def _coap_abandoned(self) -> str:
        self._message_id = (self._message_id + 1) & 0xFFFF
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(
                _coap_block1_first(self.token, self._message_id), ("127.0.0.1", self.ports["coap"])
            )
            data = s.recv(2048)
        return f"{data[1] >> 5}.{data[1] & 0x1F:02d}"

    def _mqtt_keys(self) -> str:
        base = self._rng.randrange(1 << 30)
        payload = json.dumps({f"k{base}_{j}": j for j in range(5000)}).encode()
        return self._publish(payload)

    def _publish(self, payload: bytes) -> str:
        info = self._mqtt.publish(f"v1/devices/{HOSTILE}/telemetry", payload, qos=1)
        info.wait_for_publish(10)
        return "PUBACK" if info.is_published() else "no PUBACK"

    def _late(self) -> str:
        ts = int((datetime.now(UTC) - timedelta(days=3)).timestamp() * 1000)
        return self._post(json.dumps({"ts": ts, "values": {"t": 1.0}}).encode(), "telemetry")

    @staticmethod
    def _block(level: float) -> bytes:
        samples = np.full((4096, 3), level, dtype=np.float64)
        if level:
            samples[::2] = -level
        return encode_evb1(
            samples.astype(np.float32), sample_rate_hz=25_600, start_ts=datetime.now(UTC)
        )


# --- the edge and its surroundings ----------------------------------------------------------------


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in group ``pgid``, MiB."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) != pgid:
                continue
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def write_files(tmp: Path, tokens: dict[str, str], ports: dict[str, int], mqtt_url: str) -> Path:
    devices = tmp / "devices.yaml"
    devices.write_text(
        "devices:\n" + "".join(f"  - {{id: {d}, token: {t}}}\n" for d, t in tokens.items())
    )
    secret = secrets.token_urlsafe(24)
    (tmp / "cloud-auth.yaml").write_text(f"edges:\n  - {{key: {CLOUD_KEY}, secret: {secret}}}\n")
    config = tmp / "edge.yaml"
    config.write_text(
        f"data_dir: {tmp / 'var'}\n"
        f"devices: {devices}\n"
        "transports:\n"
        f'  mqtt: {{url: "{mqtt_url}", client_id: soak-edge}}\n'
        f'  http: {{listen: "127.0.0.1:{ports["http"]}"}}\n'
        f'  coap: {{listen: "127.0.0.1:{ports["coap"]}"}}\n'
        "telemetry:\n"
        "  deadband: {absolute: 0.5}\n"
        "  window: {length: 10, allowed_lateness: 2}\n"
        "cloud:\n"
        f'  target: "127.0.0.1:{ports["cloud"]}"\n'
        f"  key: {CLOUD_KEY}\n"
        f"  secret: {secret}\n"
        "  send_points: true\n"
        "  stop_timeout: 60\n"
    )
    return config


def edgesieve(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def wait_for(cond: Callable[[], object], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"soak: timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def count(where: str, points: Counter[tuple[str, int]], accepted: set[tuple[str, int]]) -> bool:
    lost = accepted - set(points)
    doubled = {k for k, n in points.items() if n > 1}
    verdict = "ok" if not lost and not doubled else "FAILED"
    print(
        f"  {where:<10} {len(points):>9,} readings, lost {len(lost):,}, "
        f"doubled {len(doubled):,}: {verdict}"
        + (f"  (lost e.g. {sorted(lost)[:5]})" if lost else "")
    )
    return not lost and not doubled


def percentiles(values: list[float]) -> str:
    if not values:
        return "no answers"
    p50, p99 = np.percentile(np.asarray(values), [50, 99])
    return f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  ({len(values):,} answers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long devices send")
    parser.add_argument("--devices", type=int, default=3, help="good devices per transport")
    parser.add_argument("--rate", type=float, default=20.0, help="readings/s per good device")
    parser.add_argument("--hostile-every", type=float, default=0.5, help="seconds between attacks")
    parser.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling, seconds")
    args = parser.parse_args()
    if args.seconds <= 0 or args.devices < 1 or args.rate <= 0 or args.hostile_every <= 0:
        parser.error("--seconds, --rate, --hostile-every must be > 0 and --devices >= 1")

    names = [f"{k}-{i}" for k in (GOOD_MQTT, GOOD_HTTP, GOOD_COAP) for i in range(args.devices)]
    tokens = {name: secrets.token_urlsafe(18) for name in [*names, HOSTILE]}
    ports = {name: free_port("127.0.0.1") for name in ("http", "coap", "cloud")}
    ok = True
    with tempfile.TemporaryDirectory(prefix="edgesieve-soak-") as tmp_name:
        tmp = Path(tmp_name)
        with Mosquitto(tmp / "mosquitto") as broker:
            ports["mqtt"] = broker.port
            config = write_files(tmp, tokens, ports, broker.url)
            log = tmp / "edge.log"
            cloud_db = tmp / "cloud.duckdb"
            cloud = edgesieve(
                "cloud",
                "--listen",
                f"127.0.0.1:{ports['cloud']}",
                "--db",
                str(cloud_db),
                "--auth",
                str(tmp / "cloud-auth.yaml"),
                log=tmp / "cloud.log",
            )
            edge = edgesieve("run", "flows.edge", "--config", str(config), log=log)
            try:
                wait_for(
                    lambda: b"ingest: ready" in log.read_bytes() or edge.poll() is not None,
                    "the edge to start",
                    START_TIMEOUT_S,
                )
                if edge.poll() is not None:
                    sys.exit(f"soak: the edge did not start:\n{log.read_text()[-3000:]}")
                print(
                    f"soak: {args.seconds:g} s, {len(names)} good devices "
                    f"({args.devices} each over MQTT, HTTP, CoAP) at {args.rate:g} readings/s, "
                    f"one hostile action every {args.hostile_every:g} s"
                )
                samples: list[tuple[float, float]] = []
                t0 = time.monotonic()
                good = Good(tokens, ports, args.rate, args.seconds).start(args.devices)
                hostile = Hostile(tokens, ports, args.hostile_every).start()
                while time.monotonic() - t0 < args.seconds:
                    samples.append((time.monotonic() - t0, group_rss_mb(edge.pid)))
                    print(f"  t={samples[-1][0]:6.0f} s  edge RSS {samples[-1][1]:7.1f} MiB")
                    time.sleep(
                        min(args.sample_every, max(0.0, args.seconds - (time.monotonic() - t0)))
                    )
                hostile.stop()
                good.stop()
                samples.append((time.monotonic() - t0, group_rss_mb(edge.pid)))
                time.sleep(5.0)  # the broker's backlog reaches the journal
                stop_started = time.monotonic()
                edge.send_signal(signal.SIGTERM)
                code = edge.wait(STOP_TIMEOUT_S)
                stopped_s = time.monotonic() - stop_started
            finally:
                for proc in (edge, cloud):
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGTERM)
                        try:
                            proc.wait(30)
                        except subprocess.TimeoutExpired:
                            os.killpg(proc.pid, signal.SIGKILL)

        peak = max(rss for _, rss in samples)
        print(
            f"edge RSS: start {samples[0][1]:.1f} MiB, peak {peak:.1f} MiB, "
            f"end {samples[-1][1]:.1f} MiB"
        )
        print(f"edge stop: exit {code} after {stopped_s:.1f} s")
        ok &= code == 0
        print("good devices' answers:")
        for kind in (GOOD_MQTT, GOOD_HTTP, GOOD_COAP):
            total = sum((c for d, c in good.answers.items() if d.startswith(kind)), Counter())
            print(f"  {kind:<10} {dict(total)}")
        print("good requests' latency (MQTT: publish to the broker's PUBACK):")
        for transport, values in good.latency_ms.items():
            print(f"  {transport:<5} {percentiles(values)}")
        print("hostile actions' answers:")
        for name, answers in hostile.answers.items():
            print(f"  {name:<28} {dict(answers)}")

        accepted = {(d, s) for d, seqs in good.accepted.items() for s in seqs}
        devices_sql = ", ".join(f"'{name}'" for name in names)
        sql = f"select device, value from {{src}} where key = 'seq' and device in ({devices_sql})"
        print(f"accepted good readings: {len(accepted):,}")
        parquet_glob = tmp / "var" / "parquet" / "telemetry_points" / "**" / "*.parquet"
        src = f"read_parquet('{parquet_glob}', hive_partitioning=true)"
        outputs = {"parquet": duckdb.sql(sql.format(src=src)).fetchall()}
        with duckdb.connect(str(tmp / "var" / "edge.duckdb"), read_only=True) as con:
            outputs["duckdb"] = con.sql(sql.format(src="telemetry_points")).fetchall()
        with duckdb.connect(str(cloud_db), read_only=True) as con:
            outputs["cloud"] = con.sql(sql.format(src="telemetry_points")).fetchall()
        for where, rows in outputs.items():
            ok &= count(where, Counter((d, int(v)) for d, v in rows), accepted)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
