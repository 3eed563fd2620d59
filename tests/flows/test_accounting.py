import json
import threading

from prometheus_client import CollectorRegistry, generate_latest

from flows.accounting import MAX_DEVICE_LABELS, OTHER_DEVICES, RECEIVED, Meter, report


def test_counters_feed_both_report_and_prometheus(tmp_path):
    registry = CollectorRegistry()
    meter = Meter("telemetry", registry)
    other = Meter("vibration", registry)  # flows can share one registry
    meter.add(RECEIVED, {"a": 2, "b": 1}, {"a": 200, "b": 50})
    meter.add("telemetry_points", {"a": 1})
    meter.on_file("telemetry_points", 1, 25)
    other.add(RECEIVED, {"c": 5}, {"c": 1000})

    rep = report(meter)
    assert rep.messages_in == 3 and rep.raw_bytes == 250
    assert rep.stages == {RECEIVED: 3, "telemetry_points": 1}
    assert rep.devices["a"] == {RECEIVED: 2, f"{RECEIVED}_bytes": 200, "telemetry_points": 1}
    assert rep.ratio == 10.0
    assert "reduction (raw bytes / local output bytes): 10:1" in rep.render()

    text = generate_latest(registry).decode()
    assert 'edgesieve_messages_total{device="a",flow="telemetry",stage="received"} 2.0' in text
    assert 'edgesieve_bytes_total{device="c",flow="vibration",stage="received"} 1000.0' in text
    assert 'edgesieve_output_bytes_total{flow="telemetry",stream="telemetry_points"} 25.0' in text

    rep.write(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["ratio"] == 10.0


def test_ratio_is_none_before_output_and_dead_letters_do_not_count():
    meter = Meter("telemetry")
    meter.add(RECEIVED, {"a": 1}, {"a": 100})
    meter.on_file("dead_letters", 1, 50)
    rep = report(meter)
    assert rep.ratio is None
    assert "n/a (nothing written yet)" in rep.render()


def test_concurrent_adds_are_not_lost():
    meter = Meter("telemetry")

    def work() -> None:
        for _ in range(5000):
            meter.add("readings", {"a": 1, "b": 2})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.totals["readings"] == 4 * 5000 * 3
    assert report(meter).devices["b"]["readings"] == 4 * 5000 * 2


def test_raw_bytes_are_claimed_once():
    meter = Meter("telemetry")
    meter.add(RECEIVED, {"a": 1}, {"a": 100})
    meter.add("readings", {"a": 2}, {"a": 7})  # only received bytes are device bytes
    assert meter.claim_raw_bytes() == 100
    assert meter.claim_raw_bytes() == 0
    meter.add(RECEIVED, {"b": 1}, {"b": 5})
    assert meter.claim_raw_bytes() == 5


def test_wire_bytes_give_the_cloud_reduction_ratio():
    meter = Meter("vibration")
    meter.add(RECEIVED, {"m": 3}, {"m": 300_000})
    meter.on_wire("vibration_features", 6, 250)
    meter.on_wire("alarms", 1, 50)
    rep = report(meter)
    assert rep.wire_ratio == 1000.0
    assert rep.wire_rows == {"vibration_features": 6, "alarms": 1}
    assert "reduction (raw bytes / wire bytes to the cloud): 1,000:1" in rep.render()
    assert json.loads(rep.to_json())["wire_ratio"] == 1000.0
    assert report(Meter("x")).wire_ratio is None


def test_a_report_of_rows_restored_from_a_snapshot_is_not_idle():
    # a start after a crash may write rows its snapshot held without receiving a message
    meter = Meter("telemetry")
    assert report(meter).idle
    meter.on_file("telemetry_points", 50, 1990)
    rep = report(meter)
    assert not rep.idle and rep.messages_in == 0
    assert "out   telemetry_points             50 rows" in rep.render()


def test_an_idle_report_says_so_and_keeps_the_journal_lines():
    rep = report(Meter("edge"))
    rep.journal_messages, rep.journal_bytes, rep.journal_lag = 0, 0, 0
    assert rep.render() == (
        "flow edge: no device messages in this run, nothing written\n"
        "  journal: 0 messages, 0 bytes held, 0 not read by the flow"
    )


def test_devices_beyond_the_label_bound_share_one_label_and_totals_stay_exact():
    registry = CollectorRegistry()
    meter = Meter("telemetry", registry)
    children = {f"gw-child-{i}": 1 for i in range(MAX_DEVICE_LABELS + 500)}
    meter.add(RECEIVED, children, dict.fromkeys(children, 10))
    meter.add("telemetry_points", {"gw-child-0": 1, f"gw-child-{MAX_DEVICE_LABELS + 1}": 2})

    rep = report(meter)
    assert len(rep.devices) == MAX_DEVICE_LABELS + 1
    assert rep.devices[OTHER_DEVICES] == {
        RECEIVED: 500,
        f"{RECEIVED}_bytes": 5000,
        "telemetry_points": 2,
    }
    assert rep.devices["gw-child-0"]["telemetry_points"] == 1  # named before the bound: kept
    assert rep.messages_in == MAX_DEVICE_LABELS + 500 and rep.raw_bytes == 10 * rep.messages_in
    text = generate_latest(registry).decode()
    labels = {line.split('device="')[1].split('"')[0] for line in text.splitlines() if 'device="' in line}
    assert len(labels) == MAX_DEVICE_LABELS + 1
