"""``edgesieve flows check|show`` and ``edgesieve run x.flow.yaml`` end to end with real clients."""

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from flows.cli import main
from flows.standard import STANDARD_DIR
from tests.conftest import (
    DEVICES,
    TOKEN_1,
    TOKEN_2,
    coap_client,
    curl,
    free_port,
    mosquitto_pub,
    query_parquet,
    write_devices,
)

EDGESIEVE = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).parents[3]
T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

CUSTOM = """\
# yaml-language-server: $schema=flow.schema.json
flow: pressure
inputs:
  in: {channels: [telemetry]}
steps:
  kept: {op: deadband, from: in.series, absolute: 1}
  hourly: {op: window, from: in.series, length: 1h}
outputs:
  pressure_points: {from: kept}
  pressure_summary: {from: hourly, cloud: false}
"""


def test_check_prints_one_line_per_good_file(capsys):
    files = [str(STANDARD_DIR / f"{n}.flow.yaml") for n in ("telemetry", "vibration", "edge")]
    assert main(["flows", "check", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        f"{files[0]}: ok: flow telemetry, input in (telemetry, attributes), 2 steps, outputs "
        "telemetry_points, telemetry_summary, telemetry_text, device_attributes, dead_letters"
    )
    assert len(out) == 3


def test_check_prints_every_problem_and_exits_2(tmp_path, capsys):
    good = tmp_path / "good.flow.yaml"
    good.write_text(CUSTOM)
    bad = tmp_path / "bad.flow.yaml"
    bad.write_text(
        CUSTOM.replace("length: 1h", "length: -5s").replace("op: deadband", "op: deadbnd")
    )
    assert main(["flows", "check", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{good}: ok: flow pressure")
    assert captured.err.splitlines() == [
        f"edgesieve: error: {bad}: steps.kept.op: unknown step kind (got 'deadbnd'); hint: one of "
        "filter, deadband, window, spectral, threshold, logs, report_by_exception",
        f"edgesieve: error: {bad}: steps.hourly.length: must be a duration > 0 (got '-5s'); hint: "
        'a duration like "10s", "5m", "1h", "250ms" or a number of seconds',
    ]


def test_check_with_a_config_takes_its_defaults(tmp_path, capsys):
    flow = tmp_path / "w.flow.yaml"
    flow.write_text(CUSTOM.replace("length: 1h", "slide: 30s"))
    config = tmp_path / "edge.yaml"
    config.write_text("telemetry: {window: {length: 10}}\n")
    assert main(["flows", "check", str(flow)]) == 0
    assert main(["flows", "check", str(flow), "--config", str(config)]) == 2
    assert "steps.hourly.slide: must be > 0 and <= length (10) (got 30)" in capsys.readouterr().err


def test_show_prints_mermaid(tmp_path, capsys):
    flow = tmp_path / "p.flow.yaml"
    flow.write_text(CUSTOM)
    assert main(["flows", "show", str(flow)]) == 0
    assert capsys.readouterr().out == (
        "flowchart LR\n"
        '    i_in[/"in<br/>telemetry"/]\n'
        '    s_kept("kept<br/><i>deadband</i>")\n'
        '    s_hourly("hourly<br/><i>window</i>")\n'
        '    o_dead_letters[("dead_letters")]\n'
        '    o_pressure_points[("pressure_points")]\n'
        '    o_pressure_summary[("pressure_summary")]\n'
        "    i_in -- series --> s_kept\n"
        "    i_in -- series --> s_hourly\n"
        "    s_kept --> o_pressure_points\n"
        "    s_hourly --> o_pressure_summary\n"
        "    s_hourly -. late .-> o_dead_letters\n"
    )


def test_show_of_a_bad_file_exits_2(tmp_path, capsys):
    assert main(["flows", "show", str(tmp_path / "none.flow.yaml")]) == 2
    assert "none.flow.yaml: the flow file does not exist" in capsys.readouterr().err


def test_run_of_a_bad_flow_file_exits_2_before_anything_starts(tmp_path, capsys):
    (tmp_path / "edge.yaml").write_text(f"data_dir: {tmp_path / 'var'}\n")
    flow = tmp_path / "p.flow.yaml"
    flow.write_text(CUSTOM.replace("from: kept", "from: kep"))
    assert main(["run", str(flow), "--config", str(tmp_path / "edge.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"edgesieve: error: {flow}: outputs.pressure_points.from: unknown stream 'kep'" in err
    assert not (tmp_path / "var").exists()


def test_edgesieve_run_flow_file_with_mqtt_http_and_coap_devices(tmp_path, mosquitto):
    data = tmp_path / "var"
    http_listen, coap_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "edge.yaml"
    config.write_text(
        json.dumps(
            {
                "data_dir": str(data),
                "devices": str(write_devices(tmp_path, DEVICES)),
                "transports": {
                    "http": {"listen": http_listen},
                    "coap": {"listen": coap_listen},
                    "mqtt": {"url": mosquitto.url, "client_id": "ff"},
                },
                "parquet": {"max_file_age": 3600},
            }
        )
    )
    flow = tmp_path / "pressure.flow.yaml"
    flow.write_text(CUSTOM)
    # the ingest process's persistent session, registered first so QoS 1 messages wait for it
    subprocess.run(
        ["mosquitto_sub", "-p", str(mosquitto.port), "-i", "ff-telemetry", "-c", "-q", "1"]
        + ["-t", "v1/devices/+/telemetry", "-W", "1"],
        timeout=10,
        capture_output=True,
    )
    ms = int(T0.timestamp() * 1000)
    for i, value in enumerate((10.0, 10.5, 12.0)):  # 10.5 is inside the deadband
        body = json.dumps({"ts": ms + i * 1000, "values": {"bar": value}})
        mosquitto_pub(mosquitto, "v1/devices/mq-3/telemetry", message=body)
    proc = subprocess.Popen(
        [*EDGESIEVE, "run", str(flow), "--config", str(config)],
        env=os.environ,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    http = f"http://{http_listen}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if curl(f"{http}/{TOKEN_1}/telemetry", b"{}").status == 200:
                    break
            except RuntimeError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the edge did not start"
            time.sleep(0.2)
        for i, value in enumerate((5.0, 5.2, 7.0)):
            body = json.dumps({"ts": ms + i * 1000, "values": {"bar": value}}).encode()
            assert curl(f"{http}/{TOKEN_1}/telemetry", body).status == 200
        for i, value in enumerate((1.0, 3.0)):
            body = json.dumps({"ts": ms + i * 1000, "values": {"bar": value}})
            reply = coap_client(f"coap://{coap_listen}/api/v1/{TOKEN_2}/telemetry", text=body)
            assert reply.code == "2.04"
        time.sleep(2.0)  # the queued MQTT session drains
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    points = query_parquet(
        data, "pressure_points", "select device, value from {src} order by device, ts"
    )
    assert points == [
        ("fan-2", 1.0),
        ("fan-2", 3.0),
        ("mq-3", 10.0),
        ("mq-3", 12.0),
        ("pump-1", 5.0),
        ("pump-1", 7.0),
    ]
    summary = query_parquet(
        data, "pressure_summary", "select device, count, min, max from {src} order by device"
    )
    assert summary == [("fan-2", 2, 1.0, 3.0), ("mq-3", 3, 10.0, 12.0), ("pump-1", 3, 5.0, 7.0)]
    report = json.loads((data / "report-pressure.json").read_text())
    assert report["messages_in"] == 9  # the connection test {} counts too
    assert report["output_rows"] == {"pressure_points": 6, "pressure_summary": 3}
    assert "flow pressure" in out


def test_bytewax_run_needs_the_flow_file_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGESIEVE_FLOW_FILE"}
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.flowfile"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "edgesieve: error: EDGESIEVE_FLOW_FILE is not set; hint: "
        "EDGESIEVE_FLOW_FILE=telemetry.flow.yaml python -m bytewax.run flows.flowfile"
    )
    bad = tmp_path / "bad.flow.yaml"
    bad.write_text("flow: x\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bytewax.run", "flows.flowfile"],
        env={**env, "EDGESIEVE_FLOW_FILE": str(bad)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"edgesieve: error: {bad}: inputs: required key is missing" in proc.stderr


def test_bytewax_run_runs_a_standard_flow_file(tmp_path):
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'var'}\ntransports: {{http: {{listen: '127.0.0.1:{free_port()}'}}}}\ndevices: {write_devices(tmp_path, DEVICES)}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bytewax.run", "flows.flowfile"],
        env={
            **os.environ,
            "EDGESIEVE_FLOW_FILE": "telemetry.flow.yaml",
            "EDGESIEVE_CONFIG": str(config),
        },
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "var" / "journal").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert (tmp_path / "var" / "recovery" / "telemetry").is_dir()  # named by the file's flow:


def test_show_draws_each_part_in_a_box(capsys):
    assert main(["flows", "show", str(STANDARD_DIR / "edge.flow.yaml")]) == 0
    out = capsys.readouterr().out
    vibration = out[out.index('    subgraph part_vibration ["vibration"]\n') :]
    assert vibration[: vibration.index("    end\n")].splitlines()[1:] == [
        '        s_spectral("spectral<br/><i>spectral</i>")',
        '        s_alarms("alarms<br/><i>threshold</i>")',
        '        s_report("report<br/><i>report_by_exception</i>")',
        '        o_alarms[("alarms")]',
        '        o_vibration_features[("vibration_features")]',
    ]
    assert "    s_spectral --> o_vibration_features\n" in out  # every row, locally
    assert "    s_report -- cloud --> o_vibration_features\n" in out  # the reported rows
    assert '    o_dead_letters[("dead_letters")]\n    subgraph part_telemetry' in out  # shared
    assert "    s_spectral -- errors --> o_dead_letters\n" in out
