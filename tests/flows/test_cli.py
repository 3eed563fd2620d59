import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from flows.cli import main

EDGESIEVE = [sys.executable, "-m", "flows.cli"]


def test_missing_config_exits_2_with_the_reason(tmp_path, capsys):
    assert main(["run", "flows.telemetry", "--config", str(tmp_path / "edge.yaml")]) == 2
    err = capsys.readouterr().err
    assert "edgesieve: error: config file" in err and "does not exist" in err


def test_workers_must_be_positive(tmp_path, capsys):
    assert main(["run", "flows.telemetry", "-w", "0", "--config", str(tmp_path / "x.yaml")]) == 2
    assert "--workers must be at least 1 (got 0)" in capsys.readouterr().err


def test_unknown_flow_module(tmp_path, capsys):
    (tmp_path / "edge.yaml").write_text("{}\n")
    assert main(["run", "flows.nope", "--config", str(tmp_path / "edge.yaml")]) == 2
    assert "flow module 'flows.nope' not found" in capsys.readouterr().err


def test_flow_file_without_build(tmp_path, capsys):
    (tmp_path / "edge.yaml").write_text("{}\n")
    (tmp_path / "mine.py").write_text("x = 1\n")
    assert main(["run", str(tmp_path / "mine.py"), "--config", str(tmp_path / "edge.yaml")]) == 2
    assert "has no build(edge) function; hint: see examples/custom_flow.py" in capsys.readouterr().err


def test_missing_flow_file(tmp_path, capsys):
    (tmp_path / "edge.yaml").write_text("{}\n")
    assert main(["run", str(tmp_path / "gone.py"), "--config", str(tmp_path / "edge.yaml")]) == 2
    assert "flow file" in capsys.readouterr().err


def test_demo_settings_are_checked(capsys):
    assert main(["demo", "--devices", "0"]) == 2
    assert "demo needs at least one device" in capsys.readouterr().err


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.parametrize("runner", ["edgesieve", "bytewax"])
def test_run_until_sigterm_flushes_everything(tmp_path, mosquitto, runner):
    data = tmp_path / "var"
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"""
data_dir: {data}
transports:
  mqtt: {{url: "{mosquitto.url}", client_id: cli-test}}
telemetry:
  window: {{length: 3600}}
parquet: {{max_file_age: 3600}}
"""
    )
    if runner == "edgesieve":
        cmd = [*EDGESIEVE, "run", "flows.telemetry", "--config", str(config)]
        env = os.environ
    else:
        cmd = [sys.executable, "-m", "bytewax.run", "flows.telemetry"]
        env = {**os.environ, "EDGESIEVE_CONFIG": str(config)}
    # The whole chain: mosquitto -> the ingest process (journal commit, then PUBACK) -> the
    # journal -> the flow -> Parquet. The ingest process keeps a persistent session named by its
    # client id: register it first with the real mosquitto_sub, so QoS 1 messages queue for it
    # however fast it starts.
    subprocess.run(
        [
            "mosquitto_sub",
            "-p",
            str(mosquitto.port),
            "-i",
            "cli-test-telemetry",  # ingest appends the flow's data channels to the configured client_id
            "-c",
            "-q",
            "1",
            "-t",
            "v1/devices/+/telemetry",
            "-W",
            "1",
        ],
        timeout=10,
        capture_output=True,
    )
    for i in range(5):
        body = json.dumps({"ts": 1763800000000 + i * 1000, "values": {"t": float(i)}})
        subprocess.run(
            [
                "mosquitto_pub",
                "-p",
                str(mosquitto.port),
                "-q",
                "1",
                "-t",
                "v1/devices/d1/telemetry",
                "-m",
                body,
            ],
            check=True,
            timeout=10,
        )
    proc = subprocess.Popen(
        cmd, env=env, cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: data.exists() or proc.poll() is not None, 30, "the flow to start")
        time.sleep(3.0)  # connect and drain the queued session
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    glob = str(data / "parquet" / "{stream}" / "**" / "*.parquet")
    points = duckdb.sql(
        f"select value from read_parquet('{glob.format(stream='telemetry_points')}') order by ts"
    ).fetchall()
    assert points == [(0.0,), (1.0,), (2.0,), (3.0,), (4.0,)]
    # the one-hour window was still open: the clean stop closed and emitted it
    summary = duckdb.sql(
        f"select count, mean from read_parquet('{glob.format(stream='telemetry_summary')}')"
    ).fetchall()
    assert summary == [(5, 2.0)]
    assert not list(data.rglob(".*.tmp"))
    if runner == "edgesieve":
        report = json.loads((data / "report-telemetry.json").read_text())
        assert report["messages_in"] == 5
        # the clean stop drained the journal and released what the flow had read
        assert report["journal_lag"] == 0 and report["journal_messages"] == 0


def test_stop_on_signals_sets_the_event_and_restores_handlers():
    import threading

    from flows.runtime import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    with stop_on_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not stop.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


def _edge_files(tmp_path, *, mqtt: str = "{url: 'mqtt://127.0.0.1:1883', username: edge, password: edge-secret-1}"):
    (tmp_path / "devices.yaml").write_text(
        "devices:\n  - {id: pump-7, token: token-pump-7}\n  - {id: pump-8, token: token-pump-8}\n"
    )
    (tmp_path / "edge.yaml").write_text(f"devices: devices.yaml\ntransports:\n  mqtt: {mqtt}\n")
    return tmp_path / "edge.yaml"


class _IncludedBroker:
    """A real mosquitto whose own config is a listener and ``include_dir`` of the generated files."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, include: Path) -> None:
        from tests.conftest import free_port, require_binaries

        require_binaries("mosquitto")
        from connectors.devices.mosquitto import Mosquitto

        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "mosquitto.conf"
        lines = [f"listener {self.port} {self.host}", f"include_dir {include}", "log_dest stderr"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read 0600 files
        conf.write_text("\n".join(lines) + "\n")
        self.log = directory / "mosquitto.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([Mosquitto.binary(), "-c", str(conf)], stdout=log, stderr=log)
        wait_for(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        import socket

        assert self.proc.poll() is None, self.log.read_text()
        try:
            socket.create_connection((self.host, self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_mosquitto_config_is_enforced_by_a_real_mosquitto(tmp_path, capsys, mosquitto_pub):
    import paho.mqtt.client as paho

    config = _edge_files(tmp_path)
    out = tmp_path / "broker-auth"
    assert main(["devices", "mosquitto-config", "--config", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(2 devices + edge account 'edge')" in printed and f"wrote {out / 'edgesieve.conf'}" in printed
    assert f"  include_dir {out.resolve()}" in printed
    assert "  max_inflight_messages 1000" in printed and "  max_queued_messages 0" in printed
    for name in ("passwd", "acl", "edgesieve.conf"):
        assert (out / name).stat().st_mode & 0o777 == 0o600

    broker = _IncludedBroker(tmp_path / "mosquitto", out.resolve())
    try:
        # the edge account reads device topics; it never acks, as when the journal holds acks back
        got: list[paho.MQTTMessage] = []
        edge = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="edge-cli-test", protocol=paho.MQTTv311,
            manual_ack=True,
        )
        edge.username_pw_set("edge", "edge-secret-1")
        edge.on_message = lambda client, userdata, msg: got.append(msg)
        subscribed = threading.Event()
        edge.on_subscribe = lambda *args: subscribed.set()
        edge.connect(broker.host, broker.port)
        edge.loop_start()
        try:
            wait_for(edge.is_connected, 10, "the edge account to connect")
            edge.subscribe("v1/devices/+/telemetry", qos=1)
            wait_for(subscribed.is_set, 10, "the subscription")
            device = {"username": "pump-7", "password": "token-pump-7"}
            mosquitto_pub(broker, "v1/devices/pump-8/telemetry", message='{"t": 2}', **device)
            with pytest.raises(RuntimeError, match="mosquitto_pub"):
                mosquitto_pub(broker, "v1/devices/pump-7/telemetry", message="{}", username="pump-7", password="wrong-token")
            # 50 unacknowledged QoS 1 messages all arrive: mosquitto's default would stop at 20
            mosquitto_pub(broker, "v1/devices/pump-7/telemetry", lines=[f'{{"t": {i}}}' for i in range(50)], **device)
            wait_for(lambda: len(got) >= 50, 10, "50 unacknowledged messages in flight")
            time.sleep(0.3)
        finally:
            edge.loop_stop()
            edge.disconnect()
    finally:
        broker.stop()
    assert {m.topic for m in got} == {"v1/devices/pump-7/telemetry"}  # pump-7 cannot speak for pump-8
    assert [m.payload for m in got] == [f'{{"t": {i}}}'.encode() for i in range(50)]


def test_mosquitto_config_needs_the_edge_account(tmp_path, capsys):
    config = _edge_files(tmp_path, mqtt="{url: 'mqtt://127.0.0.1:1883'}")
    assert main(["devices", "mosquitto-config", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "transports.mqtt: needs username and password" in capsys.readouterr().err


def test_mosquitto_config_needs_a_registry(tmp_path, capsys):
    (tmp_path / "edge.yaml").write_text("transports: {mqtt: {username: e, password: p}}\n")
    assert main(["devices", "mosquitto-config", "--config", str(tmp_path / "edge.yaml"), "--out", str(tmp_path)]) == 2
    assert "set devices: devices.yaml" in capsys.readouterr().err


def test_cloud_tls_needs_cert_and_key(tmp_path, capsys):
    args = ["cloud", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.duckdb"), "--auth", str(tmp_path / "a.yaml")]
    assert main([*args, "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().err


def test_cloud_limit_options_are_checked(tmp_path, capsys):
    args = ["cloud", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.duckdb"), "--auth", str(tmp_path / "a.yaml")]
    assert main([*args, "--max-batch-rows", "0"]) == 2
    assert capsys.readouterr().err == (
        "edgesieve: error: ReceiverLimits.max_batch_rows (--max-batch-rows) must be an int >= 1; got 0\n"
    )


def test_cloud_command_stores_batches_and_stops_on_sigterm(tmp_path):
    import socket

    import grpc
    import pyarrow as pa

    from connectors.streams import STREAMS, to_table
    from connectors.uplink.wire import KEY_HEADER, SECRET_HEADER, batch_id_of
    from operators.threshold import Alarm
    from protos import uplink_pb2, uplink_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "s3cret-for-edge-01-xyz"
    (tmp_path / "edges.yaml").write_text(f"edges:\n  - {{key: edge-01, secret: {secret}}}\n")
    db = tmp_path / "cloud.duckdb"
    proc = subprocess.Popen(
        [*EDGESIEVE, "cloud", "--listen", f"127.0.0.1:{port}", "--db", str(db), "--auth", str(tmp_path / "edges.yaml")],
        cwd=Path(__file__).parents[2], stderr=subprocess.PIPE, text=True,
    )
    try:
        now = datetime.now(UTC)
        table = to_table(STREAMS["alarms"], [Alarm("pump-7", now, "iso_zone_d", "raised", "critical", 7.1, "pump-7/x")])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
            w.write_table(table)
        arrow_ipc = sink.getvalue().to_pybytes()
        batch_id = batch_id_of("edge-01", "alarms", arrow_ipc)
        batch = uplink_pb2.Batch(edge_id="edge-01", batch_id=batch_id, stream="alarms", priority=0, rows=1,
                                 arrow_ipc=arrow_ipc, raw_bytes=4096)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=20)
        stub = uplink_pb2_grpc.UplinkStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Push(iter([batch]), metadata=[(KEY_HEADER, "edge-01"), (SECRET_HEADER, "wrong")], timeout=10))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        acks = list(stub.Push(iter([batch]), metadata=[(KEY_HEADER, "edge-01"), (SECRET_HEADER, secret)], timeout=10))
        assert [(a.batch_id, a.status) for a in acks] == [(batch_id, uplink_pb2.Ack.STORED)]
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.sql("select batch_id, rows, raw_bytes from uplink_batches").fetchall() == [(batch_id, 1, 4096)]
        assert con.sql("select device, rule, state from alarms").fetchall() == [("pump-7", "iso_zone_d", "raised")]


def test_an_idle_edge_stopped_cleanly_prints_one_report_that_says_so(tmp_path):
    from tests.conftest import DEVICES, free_port, write_devices

    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'var'}\ndevices: {write_devices(tmp_path, DEVICES)}\n"
        f'transports: {{http: {{listen: "127.0.0.1:{free_port()}"}}}}\n'
    )
    log = tmp_path / "edge.log"
    proc = subprocess.Popen(
        [*EDGESIEVE, "run", "flows.edge", "--config", str(config)],
        cwd=Path(__file__).parents[2],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        wait_for(lambda: "ingest: ready" in log.read_text() or proc.poll() is not None, 60, "ready")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log.read_text()
    lines = out.splitlines()
    assert lines[0] == "flow edge: no device messages in this run, nothing written"
    assert lines[1] == "  journal: 0 messages, 0 bytes held, 0 not read by the flow"
    assert lines[2].startswith("  ingest: 0 commits") and len(lines) == 3


FAILING_FLOW = '''
import bytewax.operators as op
from bytewax.testing import TestingSource


def fail(item):
    raise OSError(5, "Input/output error", "/dev/sdz")


def build(edge):
    up = op.input("in", edge.flow, TestingSource([1]))
    op.inspect("out", op.map("fail", up, fail))
'''


def test_a_flow_that_fails_while_running_is_one_line_and_status_3(tmp_path):
    (tmp_path / "boom.py").write_text(FAILING_FLOW)
    (tmp_path / "edge.yaml").write_text(f"data_dir: {tmp_path / 'var'}\n")
    done = subprocess.run(
        [*EDGESIEVE, "run", str(tmp_path / "boom.py"), "--config", str(tmp_path / "edge.yaml")],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgesieve:")]
    assert errors == [
        "edgesieve: error: flow boom stopped: Input/output error (/dev/sdz); what devices were "
        f"told accepted is kept in {tmp_path / 'var' / 'journal'} and processed by the next "
        "start; hint: start the edge again; run with -v for the traceback"
    ]
