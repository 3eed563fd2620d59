"""The README's custom flow, as a user runs it: real mosquitto in, `edgesieve run`, Parquet out."""

import json
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from tests.conftest import ROOT, wait_for

EXAMPLE = ROOT / "examples" / "custom_flow.py"


@pytest.mark.parametrize("runner", ["edgesieve", "bytewax"])
def test_custom_flow_runs_end_to_end(tmp_path, mosquitto, mosquitto_pub, runner):
    data = tmp_path / "var"
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {data}\ntransports:\n  mqtt: {{url: \"{mosquitto.url}\", client_id: custom}}\n"
    )
    # The flow's persistent session (client id + channel) is registered first, so the QoS 1
    # messages below queue for it however fast the process starts.
    subprocess.run(
        ["mosquitto_sub", "-p", str(mosquitto.port), "-i", "custom-telemetry", "-c", "-q", "1",
         "-t", "v1/devices/+/telemetry", "-W", "1"],
        timeout=10, capture_output=True,
    )
    t0 = 1763800000000
    pressures = [3.0, 3.1, 3.5, 3.55, 4.0]  # moves of 0.1 and 0.05 stay inside the 0.2 deadband
    for i, p in enumerate(pressures):
        body = {"ts": t0 + i * 1000, "values": {"pressure": p, "temperature": 20.0 + i}}
        mosquitto_pub(mosquitto, "v1/devices/pump-7/telemetry", message=json.dumps(body))
    mosquitto_pub(mosquitto, "v1/devices/pump-7/telemetry", message="{not json")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if runner == "edgesieve":
        cmd = [sys.executable, "-m", "flows.cli", "run", str(EXAMPLE), "-c", str(config)]
    else:
        cmd = [sys.executable, "-m", "bytewax.run", str(EXAMPLE)]
        env["EDGESIEVE_CONFIG"] = str(config)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_for(lambda: data.exists() or proc.poll() is not None, "the flow to start", timeout=30)
        time.sleep(3.0)  # connect and drain the queued session
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    glob = str(data / "parquet" / "{}" / "**" / "*.parquet")
    points = duckdb.sql(
        f"select device, key, value from read_parquet('{glob.format('pressure_points')}') order by ts"
    ).fetchall()
    assert points == [("pump-7", "pressure", 3.0), ("pump-7", "pressure", 3.5), ("pump-7", "pressure", 4.0)]
    summary = duckdb.sql(
        f"select count, min, max from read_parquet('{glob.format('pressure_summary')}')"
    ).fetchall()
    assert summary == [(5, 3.0, 4.0)]
    dead = duckdb.sql(f"select reason from read_parquet('{glob.format('dead_letters')}')").fetchall()
    assert len(dead) == 1 and dead[0][0].startswith("telemetry: ")
    assert not (data / "parquet" / "telemetry_points").exists()  # only the declared streams
    if runner == "bytewax":
        return  # Bytewax's runner has no end-of-run report
    report = json.loads((data / "report-custom_flow.json").read_text())
    assert report["messages_in"] == 6
    assert report["output_rows"] == {"dead_letters": 1, "pressure_points": 3, "pressure_summary": 1}
    assert "flow custom_flow: 6 messages" in out


def test_the_readme_shows_the_example_whole():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write your own flow", 1)[1]
    shown = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = EXAMPLE.read_text()
    code = source[source.index('"""', source.index('"""') + 3) + 3 :].strip()
    assert shown.strip() == code
