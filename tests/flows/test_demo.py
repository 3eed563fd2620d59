import json
import logging
import re

import duckdb
import pytest

from flows.demo import DemoSettings, run_demo


@pytest.mark.parametrize("broker", ["mosquitto", "embedded"])
def test_demo_reduces_and_reports(tmp_path, broker, capsys, caplog):
    caplog.set_level(logging.INFO, logger="edgesieve.lifecycle")
    settings = DemoSettings(
        devices=3,
        seconds=3,
        rate_per_device=20,
        data_dir=tmp_path,
        broker=broker,
        machines=3,
        http_devices=2,
        coap_devices=2,
    )
    reports = run_demo(settings, status_every=0.5)
    report = reports["telemetry"]

    out = capsys.readouterr().out
    # stdout: a few lines saying what runs where, then the report; no log lines
    assert out.splitlines()[0].startswith("broker: ")
    assert " INFO " not in out and "edgesieve.http.access" not in out
    # while it runs, a status line every 0.5 s (no terminal here): the time left counts down
    lines = [r.getMessage() for r in caplog.records if r.name == "edgesieve.lifecycle.status"]
    assert len(lines) >= 4, lines
    left = [int(m.group(1)) for line in lines if (m := re.search(r", (\d+)s left;", line))]
    assert left[0] >= 2 and left[-1] == 0 and left == sorted(left, reverse=True)
    assert re.search(r"telemetry \d+ in, \d+ rows out, ratio ", lines[-1])
    assert "cloud connected" in lines[-1]
    assert "reduction (raw bytes / local output bytes):" in out
    sent = (3 + 2 + 2) * 3 * 20
    assert report.messages_in == sent
    assert report.stages["readings"] == 2 * sent
    # the deadband keeps far fewer points than readings, and every point is on disk
    assert 0 < report.stages["telemetry_points"] < report.stages["readings"] / 2
    glob = str(tmp_path / "parquet" / "telemetry_points" / "**" / "*.parquet")
    rows = duckdb.sql(
        f"select transport, count(*) from read_parquet('{glob}') group by all"
    ).fetchall()
    assert sum(n for _, n in rows) == report.stages["telemetry_points"]
    assert {t for t, _ in rows} == {"mqtt", "http", "coap"}  # each reading records its transport
    assert "http devices: 120 requests, answers {'200': 120}" in out
    assert "coap devices: 120 requests, answers {'2.04': 120}" in out
    assert report.ratio is not None and report.ratio > 1
    saved = json.loads((tmp_path / "report-telemetry.json").read_text())
    assert saved["messages_in"] == sent and saved["ratio"] == pytest.approx(report.ratio)

    vib = reports["vibration"]
    blocks = 3 * int(3 * 25_600 / 4096)
    assert vib.messages_in == blocks
    assert vib.stages["vibration_features"] > 0
    assert vib.stages.get("alarms", 0) >= 1  # the imbalanced machine is in ISO zone D
    assert vib.ratio is not None and vib.ratio > 50
    assert "alarms:" in out and "total:" in out
    assert "registry passwords and ACL" in out

    # the cloud receiver stored what the edge sealed, and its table gives the wire ratio
    from flows.demo import cloud_totals

    cloud = cloud_totals(tmp_path / "cloud.duckdb")
    assert set(cloud) == {"telemetry", "vibration", "logs"}
    assert cloud["telemetry"][1] == report.stages["telemetry_summary"]
    assert cloud["vibration"][1] == sum(vib.wire_rows.values())
    # every feature row is local; the cloud gets the reported ones (first rows, changes, alarms)
    assert 6 <= vib.wire_rows["vibration_features"] <= vib.stages["vibration_features"]
    assert vib.wire_rows.get("alarms", 0) == vib.stages.get("alarms", 0)
    assert cloud["vibration"][2] == vib.raw_bytes  # the batches stand for every device byte
    assert sum(vib.wire_bytes.values()) == cloud["vibration"][3]
    assert vib.wire_ratio is not None and vib.wire_ratio > 100
    assert "cloud received for vibration:" in out
    # two services posted their log lines over HTTP: every line counted in the logs part
    logs = reports["logs"]
    assert logs.messages_in == 2 * 3
    assert "http devices: 6 requests, answers {'200': 6}" in out
    assert cloud["logs"][1] == sum(logs.wire_rows.values()) > 0
    assert cloud["logs"][2] == logs.raw_bytes
    page = tmp_path / "report.html"  # the demo also writes the HTML report and says where
    assert f"report with charts: {page}" in out
    assert 'data-chart="vibration-rms"' in page.read_text(encoding="utf-8")
