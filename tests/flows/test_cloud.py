import json
import socket
from datetime import UTC, datetime

import duckdb
from prometheus_client import CollectorRegistry, generate_latest

from connectors.cloud import CloudReceiver
from connectors.uplink.outbox import Outbox
from flows import edge
from flows.cloud import CloudLink
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.flows.conftest import run_recorded

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SECRET = "cloud-secret-for-tests-0001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recorded() -> list[RawMessage]:
    out = [
        RawMessage(f"s-{i % 4}", "telemetry", "mqtt", T0,
                   json.dumps({"ts": 1763640000000 + i * 1000, "values": {"t": float(i % 7)}}).encode())
        for i in range(400)
    ]
    out += [RawMessage("pump-2", "vibration", "mqtt", T0, p)
            for p in blocks(Machine("imbalance", seed=5), device="pump-2", count=30, start_ts=T0)]
    return out


def test_cloud_down_at_start_then_everything_arrives_once_in_priority_order(tmp_path):
    port = free_port()
    config = parse_config(
        {
            "edge_id": "edge-01",
            "data_dir": str(tmp_path / "edge"),
            "cloud": {"target": f"127.0.0.1:{port}", "key": "edge-01", "secret": SECRET,
                      "batch_rows": 20, "backoff_max": 1,
                      "stop_timeout": 0.5},  # the cloud is down: don't wait long
        }
    )
    flow = run_recorded(edge.build, config, recorded(), name="edge")
    produced_rows = {s: n for r in flow.reports().values() for s, n in r.wire_rows.items()}
    assert produced_rows["alarms"] >= 1 and produced_rows["vibration_features"] > 0
    assert produced_rows["telemetry_summary"] > 0

    outbox_path = tmp_path / "edge" / "outbox.sqlite"
    with Outbox(outbox_path) as outbox:
        waiting = outbox.next(10_000)
    assert {b.stream for b in waiting} == set(produced_rows)
    assert sum(b.rows for b in waiting) == sum(produced_rows.values())
    produced_ids = {b.batch_id for b in waiting}

    db = tmp_path / "cloud.duckdb"
    with CloudReceiver(f"127.0.0.1:{port}", db, {"edge-01": SECRET}):
        registry = CollectorRegistry()
        link = CloudLink(config, registry)  # a restarted edge: same outbox, new sender
        link.open()
        assert link.sender is not None
        depth = generate_latest(registry).decode()
        assert "edgesieve_outbox_batches" in depth and "edgesieve_cloud_connected" in depth
        assert link.sender.flush(timeout=30)
        assert "edgesieve_outbox_batches 0.0" in generate_latest(registry).decode()
        link.close(flush_s=5)
        assert "edgesieve_outbox" not in generate_latest(registry).decode()  # closed: no stale gauges
    with duckdb.connect(str(db), read_only=True) as con:
        stored = con.sql("select batch_id, stream, priority, rows from uplink_batches order by received_at").fetchall()
        counts = dict(con.sql("select stream, sum(rows) from uplink_batches group by stream").fetchall())
    assert {b for b, *_ in stored} == produced_ids  # every batch, once
    assert {s: int(n) for s, n in counts.items()} == produced_rows
    priorities = [p for _, _, p, _ in stored]
    assert priorities == sorted(priorities), "alarms first, then features, then summaries"
    with Outbox(outbox_path) as outbox:
        assert outbox.stats().batches == 0
