"""Accepted means kept, end to end: kill -9 the whole edge again and again, then count every output.

MQTT, HTTP and CoAP devices stream numbered readings (``{"seq": n}``) into
``edgesieve run flows.edge`` (the flow's process and its ingest child, one
process group) with a real cloud receiver up. The edge is killed with SIGKILL
at random moments, long enough apart for snapshots to complete, and
restarted; then it runs until the broker's backlog is in, and stops cleanly.

Every reading moves the deadband (the tolerance is below 1), so
``telemetry_points`` holds each journaled reading once, and the counts in
``telemetry_summary`` (the final row of each window) add up to the same number. Checked in Parquet, in
``edge.duckdb`` and in the cloud: every accepted reading is there, none twice.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from connectors.cloud import CloudReceiver
from tests.conftest import DEVICES, free_port, query_parquet, wait_for, write_devices
from tests.flows.test_durability import EDGE, Devices, start

CYCLES = 20
SECRET = "cloud-secret-for-chaos-0001"


def edge_config(tmp_path: Path, mqtt_url: str, http: int, coap: int, cloud: int) -> Path:
    config = tmp_path / "edge.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'var'}\n"
        f"devices: {write_devices(tmp_path, DEVICES)}\n"
        "transports:\n"
        f'  mqtt: {{url: "{mqtt_url}", client_id: chaos-edge}}\n'
        f'  http: {{listen: "127.0.0.1:{http}"}}\n'
        f'  coap: {{listen: "127.0.0.1:{coap}"}}\n'
        "telemetry:\n"
        "  deadband: {absolute: 0.5}\n"
        "  window: {length: 2, allowed_lateness: 1}\n"
        "recovery: {snapshot_interval: 0.5}\n"
        "parquet: {max_file_age: 3}\n"
        "cloud:\n"
        f'  target: "127.0.0.1:{cloud}"\n'
        "  key: edge-01\n"
        f"  secret: {SECRET}\n"
        "  send_points: true\n"
        "  batch_age: 1\n"
        "  backoff_max: 1\n"
        "  stop_timeout: 60\n"
    )
    return config


def seqs(rows: list[tuple[str, float]]) -> Counter[tuple[str, int]]:
    return Counter((device, int(value)) for device, value in rows)


def assert_once(where: str, points: Counter[tuple[str, int]], accepted: set[tuple[str, int]]) -> None:
    doubled = sorted(k for k, n in points.items() if n > 1)
    assert not doubled, f"{where}: readings stored more than once: {doubled[:10]} ({len(doubled)})"
    missing = sorted(accepted - set(points))
    assert not missing, f"{where}: accepted readings missing: {missing[:10]} ({len(missing)})"


@pytest.mark.parametrize("run_s", [(1.5, 4.0)])
def test_kill_9_of_the_whole_edge_counts_every_accepted_reading_once_everywhere(
    tmp_path, mosquitto, run_s
):
    rng = random.Random(10)
    http_port, coap_port, cloud_port = free_port(), free_port(), free_port()
    config = edge_config(tmp_path, mosquitto.url, http_port, coap_port, cloud_port)
    data = tmp_path / "var"
    log = tmp_path / "edge.log"
    cloud_db = tmp_path / "cloud.duckdb"
    receiver = CloudReceiver(f"127.0.0.1:{cloud_port}", cloud_db, {"edge-01": SECRET}).start()
    proc = start(EDGE, config, log)
    try:
        wait_for(lambda: b"ingest: ready" in log.read_bytes() or proc.poll() is not None,
                 "the edge to start", 60)
        devices = Devices(mosquitto.port, http_port, coap_port).start()
        try:
            for _ in range(CYCLES):
                time.sleep(rng.uniform(*run_s))
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
                proc = start(EDGE, config, log)
            time.sleep(1.0)
        finally:
            devices.stop()
        time.sleep(3.0)  # the broker's backlog reaches the journal
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        receiver.stop(grace=1)
    accepted = {(d, s) for d, got in devices.accepted.items() for s in got}
    for device, got in devices.accepted.items():
        assert len(got) > 50, f"{device}: too few readings accepted to mean anything ({len(got)})"

    points_sql = "select device, value from {src} where key = 'seq'"
    # a window flushed while its device was quiet is written again, complete, if event time adds
    # to it: per window the row with the highest count is final
    count_sql = (
        "select coalesce(sum(n), 0) from (select max(count) as n from {src} where key = 'seq' "
        "group by device, window_start)"
    )
    parquet = seqs(query_parquet(data, "telemetry_points", points_sql))
    print(f"acknowledged in: {len(accepted)}, counted out in Parquet: {len(parquet)}")
    assert_once("parquet", parquet, accepted)
    assert query_parquet(data, "telemetry_summary", count_sql)[0][0] == len(parquet)

    with duckdb.connect(str(data / "edge.duckdb"), read_only=True) as con:
        local = seqs(con.sql(points_sql.format(src="telemetry_points")).fetchall())
        local_count = con.sql(count_sql.format(src="telemetry_summary")).fetchall()[0][0]
    assert local == parquet
    assert local_count == len(parquet)

    with duckdb.connect(str(cloud_db), read_only=True) as con:
        cloud = seqs(con.sql(points_sql.format(src="telemetry_points")).fetchall())
        cloud_count = con.sql(count_sql.format(src="telemetry_summary")).fetchall()[0][0]
    print(f"counted out in DuckDB: {len(local)}, in the cloud: {len(cloud)}")
    assert cloud == parquet
    assert cloud_count == len(parquet)
