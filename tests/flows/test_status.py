"""The edge status: edge_status() against the report, the status page, the console and the logs."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from flows import console as console_module
from flows import edge as edge_flow
from flows.api import Edge
from flows.config import parse_config
from flows.console import LogSetup, StatusConsole
from flows.ingest_stats import read_snapshot
from flows.machines import Machine, blocks
from flows.status import FLOW_FIELDS, edge_status, status_line
from operators.records import RawMessage
from tests.conftest import DEVICES, TOKEN_1, curl, free_port, write_devices
from tests.flows.conftest import run_recorded, running

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[2]


def recorded_messages() -> list[RawMessage]:
    """Telemetry of two sensors, an imbalanced machine (alarms) and one undecodable message."""
    out = [
        RawMessage(
            f"sensor-{d}",
            "telemetry",
            "mqtt",
            T0 + timedelta(seconds=i),
            json.dumps(
                {
                    "ts": int((T0 + timedelta(seconds=i)).timestamp() * 1000),
                    "values": {"temperature": 20 + (i % 7) * 0.5},
                }
            ).encode(),
        )
        for i in range(40)
        for d in (1, 2)
    ]
    out += [
        RawMessage("pump-2", "vibration", "mqtt", T0, p)
        for p in blocks(Machine("imbalance", seed=3), device="pump-2", count=24, start_ts=T0)
    ]
    out.append(RawMessage("sensor-1", "telemetry", "mqtt", T0, b"{not json"))
    return out


def parquet_rows(data_dir: Path, stream: str, sql: str) -> list[tuple]:
    glob = str(data_dir / "parquet" / stream / "**" / "*.parquet")
    return duckdb.sql(sql.format(src=f"read_parquet('{glob}', hive_partitioning=true)")).fetchall()


def expected_flows(edge: Edge) -> dict[str, dict]:
    """The status's per-flow numbers computed from the reduction report."""
    out = {}
    for name, rep in edge.reports().items():
        outputs = {
            "telemetry": ("telemetry_points", "telemetry_summary", "device_attributes"),
            "vibration": ("vibration_features", "alarms"),
        }.get(name, ())
        out[name] = {
            "messages_in": rep.messages_in,
            "raw_bytes": rep.raw_bytes,
            "rows_out": sum(rep.stages.get(s, 0) for s in outputs),
            "wire_bytes": sum(rep.wire_bytes.values()),
            "ratio": rep.ratio,
            "dead_letters": rep.stages.get("dead_letters", 0),
            "alarms": rep.stages.get("alarms", 0),
        }
    return out


def test_status_of_a_recorded_run_equals_the_report(tmp_path):
    config = parse_config({"edge_id": "edge-7", "data_dir": str(tmp_path)})
    edge = run_recorded(edge_flow.build, config, recorded_messages(), name="edge", batch_size=8)
    status = edge_status(edge)
    assert json.loads(json.dumps(status)) == status  # JSON as it is
    assert status["edge_id"] == "edge-7" and status["state"] == "stopped"
    assert datetime.fromisoformat(status["started_at"]).tzinfo is not None
    assert status["uptime_s"] > 0
    # the parts that own device channels, numbers equal to the report's
    assert set(status["flows"]) == {"telemetry", "vibration", "logs"}
    expected = expected_flows(edge)
    for name in ("telemetry", "vibration"):
        assert status["flows"][name] == expected[name], name
        assert list(status["flows"][name]) == list(FLOW_FIELDS)
    telemetry, vibration = status["flows"]["telemetry"], status["flows"]["vibration"]
    assert telemetry["messages_in"] == 81 and telemetry["dead_letters"] == 1
    assert vibration["messages_in"] == 24 and vibration["alarms"] >= 1
    assert vibration["ratio"] is not None and vibration["ratio"] > 50
    assert status["flows"]["logs"]["messages_in"] == 0
    assert status["devices_seen"] == 3
    # no ingest process and no cloud here
    assert status["journal"] == {"messages": 0, "bytes": 0, "oldest_age_s": 0.0, "unread": 0}
    assert status["outbox"] == {"batches": 0, "bytes": 0}
    assert status["cloud"] == {"configured": False, "connected": False, "acked_batches": 0}
    # the recent alarms are the alarm rows written, newest first
    alarms = parquet_rows(
        tmp_path, "alarms", "select device, key, rule, state, severity, ts, value from {src}"
    )
    assert 1 <= len(alarms) <= 20
    recent = status["recent_alarms"]
    assert sorted(
        (a["device"], a["key"], a["rule"], a["state"], a["severity"], a["ts"], a["value"])
        for a in recent
    ) == sorted(
        (d, k, r, s, sev, ts.astimezone(UTC).isoformat(), v) for d, k, r, s, sev, ts, v in alarms
    )


def test_status_line_and_live_block(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    edge = run_recorded(edge_flow.build, config, recorded_messages(), name="edge", batch_size=8)
    status = edge_status(edge)
    line = status_line(status, left_s=4.2)
    vib = status["flows"]["vibration"]
    assert line.startswith(
        f"status: stopped, up {status['uptime_s']:.0f}s, 4s left; telemetry 81 in, "
    )
    assert f"; vibration 24 in, {vib['rows_out']:,} rows out, ratio " in line
    assert re.search(
        r"vibration 24 in, [\d,]+ rows out, ratio [\d.,]+:1, \d+ alarms, 0 dead letters", line
    )
    assert "telemetry 81 in" in line and "1 dead letters" in line
    assert line.endswith("; 3 devices, journal 0 messages")  # no cloud configured: not shown
    assert "\n" not in line

    out = io.StringIO()
    shown = Console(file=out, force_terminal=True, width=160, color_system=None)
    with StatusConsole(edge, live=True, console=shown, left=lambda: 3.0):
        time.sleep(0.3)
    text = out.getvalue()
    assert "messages in" in text and "reduction" in text and "dead letters" in text
    assert re.search(r"vibration\s+24\s+[\d,]+", text)
    assert "devices send for 3s more" in text and "cloud not configured" in text
    assert "alarm raised" in text


def test_console_shows_warnings_and_lifecycle_the_file_everything(tmp_path, capsys):
    LogSetup(log_dir=tmp_path / "logs").apply()
    logging.getLogger("edgesieve.http.access").info("127.0.0.1 POST /api/v1/{token}/telemetry 200")
    logging.getLogger("edgesieve.run").info("an info line")
    logging.getLogger("edgesieve.lifecycle").info("flow x ready")
    logging.getLogger("edgesieve.lifecycle.status").info("status: running")
    logging.getLogger("edgesieve.uplink").warning("a warning")
    shown = capsys.readouterr().err
    assert "edgesieve.http.access" not in shown and "an info line" not in shown
    assert "flow x ready" in shown and "status: running" in shown and "a warning" in shown
    written = (tmp_path / "logs" / "edgesieve.log").read_text()
    for text in ("an info line", "flow x ready", "a warning"):
        assert text in written
    # one line per device request is kept only with -v: the access log is off, not filtered
    assert "POST /api/v1/{token}/telemetry 200" not in written
    assert not logging.getLogger("edgesieve.http.access").isEnabledFor(logging.INFO)

    LogSetup(verbose=True).apply()  # -v: every line on the console, access logs too
    logging.getLogger("edgesieve.http.access").info("127.0.0.1 GET / 404")
    logging.getLogger("edgesieve.run").debug("a debug line")
    shown = capsys.readouterr().err
    assert "edgesieve.http.access: 127.0.0.1 GET / 404" in shown and "a debug line" in shown
    assert logging.getLogger("edgesieve.http.access").isEnabledFor(logging.INFO)


def test_log_file_rotates(tmp_path, monkeypatch):
    monkeypatch.setattr(console_module, "LOG_FILE_BYTES", 4096)
    LogSetup(log_dir=tmp_path / "logs").apply()
    for i in range(2000):
        logging.getLogger("edgesieve.run").info("line %05d %s", i, "x" * 40)
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == [f"edgesieve.log{s}" for s in ("", ".1", ".2", ".3", ".4", ".5")]
    assert all((tmp_path / "logs" / f).stat().st_size <= 4096 for f in files)
    assert "line 01999" in (tmp_path / "logs" / "edgesieve.log").read_text()


def mosquitto_pub_lines(broker, topic: str, lines: list[str]) -> None:
    from tests.conftest import mosquitto_pub

    mosquitto_pub(broker, topic, lines=lines)


def test_status_page_and_json_of_a_live_edge(tmp_path, mosquitto, wait_for, caplog):
    caplog.set_level(logging.INFO, logger="edgesieve.lifecycle")
    http, metrics = free_port(), free_port()
    config = parse_config(
        {
            "edge_id": "edge-live",
            "data_dir": str(tmp_path / "edge"),
            "devices": str(write_devices(tmp_path, DEVICES)),
            "transports": {
                "mqtt": {"url": mosquitto.url, "client_id": "status-test"},
                "http": {"listen": f"127.0.0.1:{http}"},
            },
            "metrics_listen": f"127.0.0.1:{metrics}",
        }
    )
    edge = Edge(config, name="edge")
    edge_flow.build(edge)
    meters = {m.flow: m for m in edge.meter.family()}
    base = f"http://127.0.0.1:{metrics}"
    now_ms = int(time.time() * 1000)
    with running(edge), StatusConsole(edge, every=0.3, live=False):
        lines = [
            json.dumps({"ts": now_ms + i * 100, "values": {"temperature": 20 + i}})
            for i in range(30)
        ]
        mosquitto_pub_lines(mosquitto, "v1/devices/sensor-1/telemetry", lines)
        mosquitto_pub_lines(mosquitto, "v1/devices/sensor-2/telemetry", ["{not json"])
        for i in range(5):
            reply = curl(
                f"http://127.0.0.1:{http}/api/v1/{TOKEN_1}/telemetry",
                json.dumps({"pressure": 1.0 + i}).encode(),
            )
            assert reply.status == 200
        for i, payload in enumerate(
            blocks(
                Machine("imbalance", seed=1), device="pump-7", count=8, start_ts=datetime.now(UTC)
            )
        ):
            block = tmp_path / f"block-{i}.bin"
            block.write_bytes(payload)
            from tests.conftest import mosquitto_pub

            mosquitto_pub(mosquitto, "v1/devices/pump-7/vibration", file=block)
        wait_for(lambda: meters["telemetry"].totals["received"] == 36, "telemetry in", timeout=20)
        wait_for(lambda: meters["vibration"].totals["received"] == 8, "vibration in", timeout=20)

        # /status (curl) holds what the edge's own status says, numbers of the report
        def settled():
            reply = curl(f"{base}/status")
            assert reply.status == 200 and reply.headers["content-type"] == "application/json"
            got = reply.json
            snap = read_snapshot(tmp_path / "edge" / "journal")
            expected = expected_flows(edge)
            journal = {k: snap["journal"][k] for k in ("messages", "bytes", "oldest_age_s")}
            same_flows = all(got["flows"][f] == expected[f] for f in ("telemetry", "vibration"))
            same_journal = (got["journal"]["messages"], got["journal"]["bytes"]) == (
                journal["messages"],
                journal["bytes"],
            )
            return got if same_flows and same_journal else None

        got = wait_for(settled, "/status to equal the report and the ingest stats", timeout=20)
        assert got["edge_id"] == "edge-live" and got["state"] == "running"
        assert got["flows"]["telemetry"]["messages_in"] == 36
        assert got["flows"]["telemetry"]["dead_letters"] == 1
        assert got["devices_seen"] == 4  # sensor-1, sensor-2, pump-1 (HTTP), pump-7
        assert got["cloud"]["configured"] is False
        assert got["journal"]["unread"] == 0  # every committed message was read by the flow

        page = curl(f"{base}/")
        assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        html = page.body.decode()
        for needle in (
            '<table id="flows">',
            '<span id="devices-seen"',
            '<span id="journal-messages"',
            '<span id="outbox-batches"',
            '<span id="cloud-state"',
            '<table id="recent-alarms">',
            'fetch("/status"',
            "setInterval(refresh, 2000)",
        ):
            assert needle in html, needle
        assert "http://" not in html and "https://" not in html  # nothing from elsewhere

        scraped = curl(f"{base}/metrics")
        assert scraped.status == 200 and scraped.headers["content-type"].startswith("text/plain")
        received = [
            sample.value
            for family in text_string_to_metric_families(scraped.body.decode())
            for sample in family.samples
            if sample.name == "edgesieve_messages_total"
            and sample.labels.get("flow") == "telemetry"
            and sample.labels.get("stage") == "received"
        ]
        assert sum(received) == 36, scraped.body.decode()[:3000]

        missing = curl(f"{base}/nope")
        assert missing.status == 404
        assert missing.body.decode() == (
            "/nope: not found; hint: / (status page), /status (JSON), /metrics\n"
        )
        for method in ("POST", "PUT", "DELETE"):
            refused = curl(f"{base}/status", b"{}", method=method)
            assert refused.status == 405 and refused.headers["allow"] == "GET"
            assert refused.body.decode() == (f"{method} /status: read-only, only GET is allowed\n")
        time.sleep(0.7)
    shown = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("flow edge starting with 1 worker(s)") for m in shown)
    assert "stopping ingest, then draining the journal through the flow" in shown
    status_lines = [m for m in shown if m.startswith("status: running")]
    assert status_lines and "telemetry 36 in" in status_lines[-1]
    assert "flow edge stopped" in shown
    with pytest.raises(RuntimeError, match="exit 7"):
        curl(f"{base}/status")  # the page stops with the edge, the port is free again
    final = edge_status(edge)
    assert final["state"] == "stopped"
    assert {(a["device"], a["state"]) for a in final["recent_alarms"]} >= {("pump-7", "raised")}


def edgesieve(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize("verbose", [False, True])
def test_run_console_access_logs_only_with_v(tmp_path, verbose, wait_for):
    http = free_port()
    data_dir = tmp_path / "var"
    (tmp_path / "edge.yaml").write_text(
        f"data_dir: {data_dir}\ndevices: {write_devices(tmp_path, DEVICES)}\n"
        f'transports: {{http: {{listen: "127.0.0.1:{http}"}}}}\n'
    )
    args = ["-v"] if verbose else []
    proc = edgesieve(
        *args,
        "run",
        "flows.telemetry",
        "--config",
        str(tmp_path / "edge.yaml"),
        "--status-every",
        "0.5",
    )
    try:

        def post() -> bool:
            try:
                return (
                    curl(
                        f"http://127.0.0.1:{http}/api/v1/{TOKEN_1}/telemetry",
                        b'{"temperature": 21}',
                    ).status
                    == 200
                )
            except RuntimeError:
                return False

        wait_for(post, "the edge to accept a reading", timeout=30)
        time.sleep(1.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "flow telemetry: 1 messages" in out
    assert "edgesieve.lifecycle: flow telemetry starting with 1 worker(s)" in err
    assert "edgesieve.lifecycle: ingest: ready (http)" in err
    assert "edgesieve.lifecycle: flow telemetry stopped" in err
    assert "edgesieve.lifecycle.status: status: running, up" in err
    assert ("edgesieve.http.access" in err) is verbose
    assert ("INFO edgesieve.run: recovery: created" in err) is verbose
    logs = data_dir / "logs"
    assert "SIGTERM received: stopping cleanly" in (logs / "edgesieve.log").read_text()
    assert ("edgesieve.http.access" in (logs / "ingest.log").read_text()) is verbose


def test_status_every_must_not_be_negative(tmp_path):
    proc = edgesieve("run", "flows.telemetry", "--status-every", "-1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == (
        "edgesieve: error: --status-every must be 0 (never) or a number of seconds (got -1); "
        "hint: --status-every 10"
    )


def test_a_log_directory_that_cannot_be_used_is_one_line(tmp_path):
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "logs").write_text("not a directory")
    (tmp_path / "edge.yaml").write_text(
        f'data_dir: {data_dir}\ntransports: {{http: {{listen: "127.0.0.1:{free_port()}"}}}}\n'
        f"devices: {write_devices(tmp_path, DEVICES)}\n"
    )
    proc = edgesieve("run", "flows.telemetry", "--config", str(tmp_path / "edge.yaml"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == (
        f"edgesieve: error: log directory {data_dir / 'logs'}: cannot write the log file there "
        "(File exists); hint: check the permissions and free space of data_dir"
    )
    assert os.path.isfile(data_dir / "logs")


class FullDisk(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_log_file_that_cannot_be_written_is_one_warning(tmp_path, capsys):
    LogSetup(log_dir=tmp_path / "logs").apply()
    (log_file,) = [
        h for h in logging.getLogger().handlers if isinstance(h, console_module._LogFile)
    ]
    log_file.stream = FullDisk()  # the fault: the disk is full
    logging.getLogger("edgesieve.run").info("a line that cannot be written")
    logging.getLogger("edgesieve.uplink").warning("a warning that still reaches the console")
    shown = capsys.readouterr().err
    warning = (
        f"WARNING edgesieve.run: log file {tmp_path / 'logs' / 'edgesieve.log'}: cannot write "
        "(No space left on device); log lines are dropped until it can; hint: free space on that disk"
    )
    assert shown.count(warning) == 1 and "Traceback" not in shown
    assert "a warning that still reaches the console" in shown


def test_cloud_and_outbox_in_the_status_are_what_the_receiver_stored(tmp_path):
    from connectors.cloud import CloudReceiver

    secret = "a-secret-of-edge-01-xyz"
    with CloudReceiver("127.0.0.1:0", tmp_path / "cloud.duckdb", {"edge-01": secret}) as receiver:
        config = parse_config(
            {
                "edge_id": "edge-01",
                "data_dir": str(tmp_path / "edge"),
                "cloud": {
                    "target": f"127.0.0.1:{receiver.port}",
                    "key": "edge-01",
                    "secret": secret,
                },
            }
        )
        edge = run_recorded(edge_flow.build, config, recorded_messages(), name="edge", batch_size=8)
    status = edge_status(edge)
    with duckdb.connect(str(tmp_path / "cloud.duckdb"), read_only=True) as con:
        ((batches, wire),) = con.sql(
            "select count(*), sum(wire_bytes) from uplink_batches"
        ).fetchall()
    assert batches > 0
    assert status["cloud"] == {"configured": True, "connected": False, "acked_batches": batches}
    assert status["outbox"] == {"batches": 0, "bytes": 0}  # everything acknowledged
    assert sum(f["wire_bytes"] for f in status["flows"].values()) == wire
    assert "cloud disconnected" in status_line(status) and "outbox 0 batches" in status_line(status)
