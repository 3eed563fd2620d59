"""Ingest metrics: the ingest process's counters reach the flow's /metrics and its report."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.devices.ingress import Ingress, Verdict
from connectors.devices.journal import JournalFull, JournalSettings
from flows.accounting import FlowReport, IngestCollector, Meter, report
from flows.api import Edge
from flows.config import parse_config
from flows.ingest_stats import (
    COMMIT_BUCKETS,
    STALE_AFTER_S,
    STATS_FILE,
    MeteredJournal,
    StatsWriter,
    read_snapshot,
    remove_snapshot,
)
from operators.records import RawMessage
from tests.conftest import DEVICES, curl, free_port, write_devices

MS = 1_700_000_000_000


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics and parse it: sample name -> {sorted labels: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())))


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_ingest_counters_reach_metrics_and_the_report_across_an_ingest_restart(tmp_path):
    http, metrics_port = free_port(), free_port()
    config = parse_config(
        {
            "data_dir": str(tmp_path),
            "devices": str(write_devices(tmp_path, DEVICES)),
            "transports": {"http": {"listen": f"127.0.0.1:{http}"}},
            "metrics_listen": f"127.0.0.1:{metrics_port}",
            "journal": {"partitions": 1},
        }
    )
    edge = Edge(config, name="m")
    edge.output("telemetry_points", edge.devices("in").readings)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run=edge.run()), daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{http}/api/v1/{DEVICES['pump-1']}/telemetry"
    try:
        assert edge.wait_ready(timeout=30)
        for i in range(5):
            assert curl(url, json.dumps({"ts": MS + i, "values": {"t": i}}).encode()).status == 200

        def counted() -> dict | None:
            m = scrape(metrics_port)
            return m if value(m, "edgesieve_journal_commit_seconds_count") == 5 else None

        m = wait_until(counted, 15, "5 commits timed on /metrics")
        assert value(m, "edgesieve_ingest_up") == 1
        assert value(m, "edgesieve_ingest_restarts_total") == 0
        assert value(m, "edgesieve_ingest_refused_total") == 0
        assert value(m, "edgesieve_journal_commits_total") == 5  # one request at a time: one group each
        assert value(m, "edgesieve_journal_duplicates_total") == 0
        assert value(m, "edgesieve_mqtt_acks_withheld_total") == 0
        assert value(m, "edgesieve_ingest_stats_age_seconds") < STALE_AFTER_S
        assert value(m, "edgesieve_journal_oldest_age_seconds") is not None
        assert value(m, "edgesieve_journal_messages") is not None  # the existing depth gauges
        buckets = [value(m, "edgesieve_journal_commit_seconds_bucket", le=str(b)) for b in COMMIT_BUCKETS]
        assert buckets == sorted(buckets)  # cumulative
        assert value(m, "edgesieve_journal_commit_seconds_bucket", le="+Inf") == 5
        assert 0 < value(m, "edgesieve_journal_commit_seconds_sum") < 5 * COMMIT_BUCKETS[-1]

        # kill -9 the ingest process: it is restarted, and its successor carries the counters on
        supervisor = edge._shared.ingest._supervisor
        wait_until(lambda: read_snapshot(tmp_path / "journal")["commits"] >= 1, 5, "a snapshot")
        os.kill(supervisor.pid, signal.SIGKILL)
        wait_until(lambda: value(scrape(metrics_port), "edgesieve_ingest_restarts_total") == 1, 20, "restart")
        assert edge.wait_ready(timeout=30)
        assert curl(url, json.dumps({"ts": MS + 9, "values": {"t": 9}}).encode()).status == 200
        m = wait_until(
            lambda: (lambda m: m if value(m, "edgesieve_journal_commit_seconds_count") == 6 else None)(
                scrape(metrics_port)
            ),
            15,
            "the 6th commit timed after the restart",
        )
        assert value(m, "edgesieve_journal_commits_total") == 6  # carried over, plus one
        assert value(m, "edgesieve_ingest_up") == 1
    finally:
        edge.stop.set()
        runner.join(60)
    assert not runner.is_alive()
    rep = result["run"].reports["m"]
    assert rep.messages_in == 6
    assert rep.ingest_restarts == 1 and rep.refused == 0 and rep.duplicates == 0
    assert rep.acks_withheld == 0 and rep.journal_commits == 6
    assert rep.journal_commit_p99_ms >= rep.journal_commit_p50_ms > 0
    assert "ingest:" in rep.render() and "1 restarts" in rep.render()
    assert read_snapshot(tmp_path / "journal")["up"] is False  # the last ingest process stopped


def raw(device: str, payload: bytes) -> RawMessage:
    return RawMessage(device, "telemetry", "mqtt", datetime.now(UTC), payload)


def test_duplicates_are_counted_and_a_stopped_or_stale_snapshot_is_not_up(tmp_path):
    journal = MeteredJournal(JournalSettings(tmp_path, partitions=1, linger=timedelta(0)))
    ingress = Ingress(max_payload_bytes=1024, journal=journal)
    try:
        writer = StatsWriter(journal, ingress)
        writer.start()
        for _ in range(2):
            journal.submit(raw("d", b"same"), redelivery=True).result(10)
    finally:
        journal.close()
    offer = asyncio.run(ingress.deliver("d", "telemetry", "http", b"{}"))  # the 503 of a stop
    assert offer.verdict is Verdict.OVERLOADED
    writer.stop()
    snap = read_snapshot(tmp_path)
    assert snap["duplicates"] == 1 and snap["commits"] == 2 and snap["up"] is False
    assert snap["refused"] == 1
    assert sum(snap["commit_seconds"]["counts"]) == 2

    registry_metrics = {
        f.name: f for f in IngestCollector(tmp_path, lambda: 3).collect()
    }
    assert registry_metrics["edgesieve_ingest_up"].samples[0].value == 0
    assert registry_metrics["edgesieve_ingest_restarts"].samples[0].value == 3
    assert registry_metrics["edgesieve_journal_duplicates"].samples[0].value == 1
    assert registry_metrics["edgesieve_ingest_refused"].samples[0].value == 1

    # a running process that stopped writing (hung, or killed) is stale
    body = json.loads((tmp_path / STATS_FILE).read_text())
    old = datetime.now(UTC) - timedelta(seconds=STALE_AFTER_S + 1)
    body.update(running=True, written_at=old.isoformat())
    (tmp_path / STATS_FILE).write_text(json.dumps(body))
    snap = read_snapshot(tmp_path)
    assert snap["up"] is False and snap["age_s"] > STALE_AFTER_S


def test_device_share_refusals_and_aborted_requests_reach_metrics(tmp_path):
    settings = JournalSettings(tmp_path, partitions=1, max_bytes=1000, device_share=0.3)
    with MeteredJournal(settings) as journal:
        ingress = Ingress(max_payload_bytes=1024, journal=journal)
        writer = StatsWriter(journal, ingress)
        for i in range(3):
            journal.submit(raw("flood", bytes([i]) * 100)).result(10)
        with pytest.raises(JournalFull):
            journal.submit(raw("flood", b"x")).result(1)
        done = threading.Event()
        assert journal.append_received(
            "flood", "telemetry", "mqtt", 0, b"m" * 100, lambda *_: done.set(), over_share=True
        )
        assert done.wait(10)
        ingress.aborted += 2  # what the HTTP server counts for a client gone mid-body
    writer.stop()
    metrics = {
        f.name: f.samples[0].value for f in IngestCollector(tmp_path, lambda: 0).collect()
    }
    assert metrics["edgesieve_journal_refused_share"] == 1
    assert metrics["edgesieve_journal_over_share"] == 1
    assert metrics["edgesieve_http_client_aborted"] == 2


def test_a_new_ingest_process_carries_the_counters_of_the_one_before(tmp_path):
    for expected in (1, 2):
        with MeteredJournal(JournalSettings(tmp_path, partitions=1)) as journal:
            writer = StatsWriter(journal)
            journal.submit(raw("d", b"x")).result(10)
        writer.stop()
        snap = read_snapshot(tmp_path)
        assert snap["commits"] == expected
        assert sum(snap["commit_seconds"]["counts"]) == expected


def test_a_new_run_starts_without_the_last_runs_snapshot(tmp_path):
    (tmp_path / STATS_FILE).write_text("{}")
    (tmp_path / f".{STATS_FILE}.123.tmp").write_text("{")  # left by a kill -9 mid-write
    remove_snapshot(tmp_path)
    assert list(tmp_path.iterdir()) == []
    remove_snapshot(tmp_path / "nowhere")  # nothing to remove is fine


def test_an_unreadable_snapshot_is_logged_and_ignored(tmp_path, caplog):
    (tmp_path / STATS_FILE).write_text("not json")
    assert read_snapshot(tmp_path) is None
    assert f"cannot read {tmp_path / STATS_FILE}" in caplog.text and "hint:" in caplog.text
    assert read_snapshot(tmp_path / "nowhere") is None


def test_a_snapshot_that_cannot_be_written_is_logged(tmp_path, caplog):
    with MeteredJournal(JournalSettings(tmp_path, partitions=1)) as journal:
        writer = StatsWriter(journal)
    (tmp_path / STATS_FILE).mkdir()  # not a file: the rename fails
    writer.stop()
    assert f"ingest stats: cannot write {tmp_path / STATS_FILE} (IsADirectoryError" in caplog.text
    assert "hint: check the space" in caplog.text


def test_no_ingest_stats_leave_the_report_as_before():
    rep = report(Meter("f"))
    assert rep.journal_commits is None and "ingest:" not in rep.render()
    assert FlowReport("f").ingest_restarts is None
