"""The HTML report in a real browser: charts drawn, numbers equal their sources, nothing fetched.

A small real data directory is made by the whole edge flow (``flows.edge``)
on recorded device messages (``Edge(config, source=TestingSource(...))``):
telemetry of three sensors with a deadband and one-minute windows, two
vibrating machines (one healthy, one out of balance, so an alarm is raised),
and two malformed messages (dead letters); batches go over gRPC to a real
``CloudReceiver`` on a loopback port. ``edgesieve report DATA --cloud DB
--out report.html`` then writes the report, opened from ``file://`` in
headless Chromium. Each chart must be a drawn plotly plot, or an explicit "no
data" note where the data has none; each number cell's ``data-value`` must
equal what DuckDB reads from the Parquet files and the receiver's
``uplink_batches``, or the run report (``data_dir/report-<flow>.json``).
"""

from __future__ import annotations

import json
import math
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
from bytewax.testing import TestingSource

from connectors.cloud import CloudReceiver
from connectors.codecs.evb1 import encode_evb1
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine
from flows.simulator import telemetry_payloads
from operators.records import RawMessage
from tests.browser.conftest import Browser, artifacts_dir, chromium
from tests.conftest import ROOT

pytest.importorskip("flows.report", reason="flows.report (edgesieve report) is not on this branch")

EDGE_ID = "browser-edge"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
SENSORS = 3
SENSOR_SECONDS = 300
MACHINES = {"pump-1": "healthy", "fan-2": "imbalance"}
BLOCK_FRAMES = 4096
BLOCKS = 40
"""Vibration blocks per machine: 6.4 s at 25.6 kHz."""
BAD = [("sensor-000", b"{not json"), ("sensor-001", b"\xff\xfe not UTF-8")]
"""Malformed telemetry: dead letters with a reason."""

CHARTS = (
    "raw-wire-over-time",
    "ratio-by-stream",
    "ratio-by-device",
    "telemetry-series",
    "vibration-rms",
    "band-energy",
    "spectrum",
    "alarms-timeline",
    "dead-letters",
)
"""Every chart the report has (``<div class="chart" data-chart=NAME>``)."""

DRAWN = """
const marks = (root) => [...root.querySelectorAll(
  '.main-svg g.trace path, .main-svg g.trace text, .main-svg g.hm image, .main-svg g.slice path'
)].filter(el => {
  const box = el.getBoundingClientRect();
  const d = el.getAttribute('d');
  return (box.width > 0 || box.height > 0) && d !== 'M0,0Z' && d !== '';
}).length;
return [...document.querySelectorAll('div.chart[data-chart]')].map(c => {
  const plot = c.querySelector('.js-plotly-plot');
  // _fullData: the traces as plotly drew them (base64-encoded arrays of data decoded)
  const traces = plot ? (plot._fullData || plot.data || []) : [];
  const len = (a) => (a && typeof a.length === 'number') ? a.length : 0;
  const points = traces.reduce(
    (n, t) => n + Math.max(len(t.x), len(t.y), len(t.z), len(t.values)), 0
  );
  return {
    name: c.dataset.chart,
    empty: c.dataset.empty === 'true' || c.querySelector('[data-empty="true"]') !== null,
    note: c.innerText.trim().slice(0, 200),
    svg: c.querySelectorAll('.main-svg').length,
    points: points,
    marks: marks(c),
  };
});
"""
"""Per chart: its name, whether it is a "no data" note, and what plotly drew (points, marks)."""

CELLS = """
const [table, key] = arguments;
return [...document.querySelectorAll(`table#${table} tr[data-${key}]`)].map(tr => ({
  row: tr.getAttribute(`data-${key}`),
  cells: Object.fromEntries([...tr.querySelectorAll('td[data-field]')].map(
    td => [td.dataset.field, td.dataset.value === undefined ? null : td.dataset.value]
  )),
}));
"""
"""The rows of a table (keyed by ``data-<key>``) and their number cells' ``data-value``."""


@dataclass(frozen=True)
class Report:
    """A data directory, its receiver's database and the report written from them."""

    data_dir: Path
    db: Path
    html: Path

    def local(self, stream: str, sql: str) -> list[tuple]:
        """``sql`` over ``stream``'s Parquet files (``{src}`` in ``sql``)."""
        files = list((self.data_dir / "parquet" / stream).rglob("*.parquet"))
        if not files:
            return []
        source = (
            f"read_parquet('{self.data_dir}/parquet/{stream}/**/*.parquet', hive_partitioning=true)"
        )
        return duckdb.sql(sql.format(src=source)).fetchall()

    def cloud(self, sql: str) -> list[tuple]:
        with duckdb.connect(str(self.db), read_only=True) as con:
            return con.execute(sql).fetchall()

    def flow_report(self, flow: str) -> dict[str, Any]:
        return json.loads((self.data_dir / f"report-{flow}.json").read_text())


def messages(*, vibration: bool = True) -> list[RawMessage]:
    """Telemetry, vibration blocks and malformed messages of one short run, in time order
    (without ``vibration``: the well-formed telemetry only)."""
    out = [
        RawMessage(device, "telemetry", "mqtt", T0 + timedelta(seconds=i // SENSORS), body)
        for i, (device, body) in enumerate(
            telemetry_payloads(SENSORS, SENSOR_SECONDS, start=T0, seed=3)
        )
    ]
    if not vibration:
        return out
    out += [RawMessage(d, "telemetry", "http", T0 + timedelta(seconds=5), b) for d, b in BAD]
    machines = {d: Machine(kind, seed=i) for i, (d, kind) in enumerate(MACHINES.items())}
    for i in range(BLOCKS):
        start = T0 + timedelta(seconds=i * BLOCK_FRAMES / 25_600)
        for device, machine in machines.items():
            payload = encode_evb1(
                machine.signal(i * BLOCK_FRAMES, BLOCK_FRAMES),
                sample_rate_hz=machine.sample_rate_hz,
                start_ts=start,
            )
            out.append(RawMessage(device, "vibration", "mqtt", start, payload))
    return sorted(out, key=lambda m: m.received_at)


def make_data(tmp: Path, recorded: list[RawMessage]) -> tuple[Path, Path]:
    """Run ``flows.edge`` on ``recorded`` into a real receiver: (data_dir, cloud db)."""
    from flows import edge as edge_flow

    data_dir, db = tmp / "edge", tmp / "cloud.duckdb"
    secret = secrets.token_urlsafe(18)
    with CloudReceiver("127.0.0.1:0", db, {EDGE_ID: secret}) as receiver:
        config = parse_config(
            {
                "edge_id": EDGE_ID,
                "data_dir": str(data_dir),
                "telemetry": {"deadband": {"percent": 1.0}, "window": {"length": 60}},
                "cloud": {
                    "target": f"127.0.0.1:{receiver.port}",
                    "key": EDGE_ID,
                    "secret": secret,
                    "send_points": True,
                    "stop_timeout": 30,
                },
            },
            source="browser test",
        )
        edge = Edge(config, name="edge", source=TestingSource(recorded, 64))
        edge_flow.build(edge)
        edge.run()
    return data_dir, db


def write_report(tmp: Path, recorded: list[RawMessage]) -> Report:
    """The data of ``recorded`` and ``edgesieve report DATA --cloud DB --out r.html`` on it."""
    data_dir, db = make_data(tmp, recorded)
    html = tmp / "r.html"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "report", str(data_dir), "--cloud", str(db)]
        + ["--out", str(html)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert html.is_file(), proc.stdout + proc.stderr
    return Report(data_dir, db, html)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    return write_report(tmp_path_factory.mktemp("report"), messages())


DRAWN_ALL = (
    "[...document.querySelectorAll('div.chart .js-plotly-plot')]"
    ".every(p => p.querySelector('.main-svg') !== null)"
)
"""True once plotly has drawn every plot of the page."""


@pytest.fixture(scope="module")
def page(request: pytest.FixtureRequest, report: Report) -> Iterator[Browser]:
    """The report open in headless Chromium once plotly has drawn every plot (one browser for
    the module's tests: loading plotly.js is the slow part)."""
    with chromium(artifacts_dir(request.node, "report")) as browser:
        browser.open(report.html.as_uri(), label="report", ready=DRAWN_ALL)
        yield browser


def has_data(report: Report) -> dict[str, bool]:
    """Whether the data has anything for each chart (then it must be drawn, not a note)."""
    features = report.local("vibration_features", "select count(*) from {src}")
    alarms = report.local("alarms", "select count(*) from {src}")
    dead = report.local("dead_letters", "select count(*) from {src}")
    points = report.local("telemetry_points", "select count(*) from {src}")
    batches = report.cloud("select count(*) from uplink_batches")
    vibration = bool(features and features[0][0])
    return {
        "raw-wire-over-time": bool(batches[0][0]),
        "ratio-by-stream": bool(batches[0][0]),
        "ratio-by-device": bool(points and points[0][0]),
        "telemetry-series": bool(points and points[0][0]),
        "vibration-rms": vibration,
        "band-energy": vibration,
        "spectrum": vibration,
        "alarms-timeline": bool(alarms and alarms[0][0]),
        "dead-letters": bool(dead and dead[0][0]),
    }


def test_the_data_has_something_for_every_chart(report: Report) -> None:
    """The fixture's data directory exercises every chart (else the test below proves less)."""
    assert has_data(report) == dict.fromkeys(CHARTS, True)
    raised = report.local("alarms", "select device from {src} where state = 'raised'")
    assert {d for (d,) in raised} == {"fan-2"}


def check_charts(page: Browser, report: Report) -> None:
    """Every chart is present; drawn with visible data where the data has some, else a note."""
    charts = page.js(DRAWN)
    names = [c["name"] for c in charts]
    assert set(CHARTS) <= set(names), f"charts missing: {sorted(set(CHARTS) - set(names))}"
    wanted = has_data(report)
    for chart in charts:
        if chart["empty"]:
            assert not wanted.get(chart["name"], False), f"{chart} is a 'no data' note: data exists"
            assert chart["svg"] == 0, f"{chart}: a 'no data' note must not hold a plot"
            assert chart["note"], f"{chart}: the 'no data' note says nothing"
        else:
            assert wanted.get(chart["name"], True), f"{chart}: a plot where the data has none"
            assert chart["svg"] >= 1, f"{chart}: no plotly plot in it"
            assert chart["points"] > 0, f"{chart}: a plot without data points"
            assert chart["marks"] > 0, f"{chart}: plotly drew nothing visible"


def test_every_chart_is_drawn_without_console_errors(page: Browser, report: Report) -> None:
    check_charts(page, report)
    page.assert_quiet()


def test_charts_without_data_are_notes_not_empty_plots(browser: Browser, tmp_path: Path) -> None:
    report = write_report(tmp_path, messages(vibration=False))
    assert not any(
        has_data(report)[c] for c in ("vibration-rms", "alarms-timeline", "dead-letters")
    )
    browser.open(report.html.as_uri(), label="telemetry-only", ready=DRAWN_ALL)
    check_charts(browser, report)


def number(text: str | None) -> float:
    assert text is not None, "a number cell without data-value"
    return math.nan if text in ("", "null", "NaN") else float(text)


def same(shown: str | None, expected: float | None, where: str) -> None:
    got = number(shown)
    if expected is None:
        assert math.isnan(got), f"{where}: shows {shown}, the source has none"
    else:
        assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-12), (
            f"{where}: shows {shown}, the source has {expected}"
        )


def summary_value(rep: dict[str, Any], field: str) -> float | None:
    """The run report's number named ``field`` (a JSON key, ``map.key``, or an aggregate)."""
    outputs = {s: n for s, n in rep["output_rows"].items() if s != "dead_letters"}
    derived = {
        "rows_out": sum(outputs.values()),
        "output_bytes": sum(n for s, n in rep["output_bytes"].items() if s != "dead_letters"),
        "wire_rows": sum(rep["wire_rows"].values()),
        "wire_bytes": sum(rep["wire_bytes"].values()),
        "dead_letters": rep["output_rows"].get("dead_letters", 0),
        "alarms": rep["stages"].get("alarms", 0),
        "devices": len(rep["devices"]),
    }
    if field in derived:
        return derived[field]
    if "." in field:
        table, key = field.split(".", 1)
        assert isinstance(rep.get(table), dict), (
            f"summary field {field!r}: no {table} in the report"
        )
        return rep[table].get(key, 0)
    assert field in rep, (
        f"summary field {field!r} is neither in report-{rep['flow']}.json nor known"
    )
    return rep[field]


def test_summary_numbers_equal_the_run_reports(page: Browser, report: Report) -> None:
    rows = page.js(CELLS, "summary", "flow")
    flows = {r["row"] for r in rows}
    assert {"telemetry", "vibration"} <= flows, rows
    for row in rows:
        rep = report.flow_report(row["row"])
        assert {"messages_in", "raw_bytes"} <= set(row["cells"]), row
        for field, shown in row["cells"].items():
            same(shown, summary_value(rep, field), f"summary {row['row']} {field}")


def test_per_stream_numbers_and_the_text_report_equal_the_run_reports(
    page: Browser, report: Report
) -> None:
    """The per-stream rows of the summary, and the text report exactly as the CLI prints it."""
    from dataclasses import fields

    from flows.accounting import FlowReport

    reports = {
        path.stem.removeprefix("report-"): json.loads(path.read_text())
        for path in sorted(report.data_dir.glob("report-*.json"))
    }
    rows = page.js(CELLS, "summary-streams", "stream")
    expected = {
        f"{flow}/{stream}": {
            "rows": rep["output_rows"].get(stream, 0),
            "bytes": rep["output_bytes"].get(stream, 0),
            "wire_rows": rep["wire_rows"].get(stream, 0),
            "wire_bytes": rep["wire_bytes"].get(stream, 0),
        }
        for flow, rep in reports.items()
        for stream in {*rep["output_rows"], *rep["wire_rows"]}
    }
    assert {r["row"] for r in rows} == set(expected)
    for row in rows:
        assert set(row["cells"]) == set(expected[row["row"]]), row
        for field, shown in row["cells"].items():
            same(shown, expected[row["row"]][field], f"summary-streams {row['row']} {field}")
    names = {f.name for f in fields(FlowReport)}
    text = "\n".join(
        FlowReport(**{k: v for k, v in rep.items() if k in names}).render()
        for _, rep in sorted(reports.items())
    )
    assert page.js("return document.getElementById('text-report').textContent;") == text


STREAM_SQL = (
    "select stream, count(*), sum(rows), sum(raw_bytes), sum(wire_bytes) "
    "from uplink_batches group by stream"
)


def test_ratio_by_stream_equals_the_receivers_uplink_batches(page: Browser, report: Report) -> None:
    rows = page.js(CELLS, "ratio-streams", "stream")
    truth = {
        s: {"batches": b, "rows": r, "raw_bytes": raw, "wire_bytes": wire, "ratio": raw / wire}
        for s, b, r, raw, wire in report.cloud(STREAM_SQL)
    }
    assert {r["row"] for r in rows} == set(truth), rows
    for row in rows:
        assert {"raw_bytes", "wire_bytes", "ratio"} <= set(row["cells"]), row
        for field, shown in row["cells"].items():
            assert field in truth[row["row"]], f"ratio-streams: unknown field {field!r}"
            same(shown, truth[row["row"]][field], f"ratio-streams {row['row']} {field}")


def device_wire_bytes(report: Report) -> dict[str, float]:
    """Each device's share of the wire bytes: every uplink batch's ``wire_bytes`` shared out
    evenly to the rows the receiver stored from it (joined on batch_id), summed per device."""
    with duckdb.connect(str(report.db), read_only=True) as con:
        tables = [
            t
            for (t,) in con.execute(
                "select table_name from information_schema.columns where column_name = 'device'"
            ).fetchall()
        ]
        shares = " union all ".join(
            f'select t.device, b.wire_bytes / b.rows as share from "{t}" t '
            "join uplink_batches b using (batch_id, edge_id)"
            for t in tables
        )
        return dict(con.execute(f"select device, sum(share) from ({shares}) group by 1").fetchall())


def test_ratio_by_device_equals_the_run_reports_and_the_receiver(
    page: Browser, report: Report
) -> None:
    rows = page.js(CELLS, "ratio-devices", "device")
    raw: dict[str, int] = {}
    for flow in ("telemetry", "vibration", "logs"):
        if (report.data_dir / f"report-{flow}.json").exists():
            for device, counts in report.flow_report(flow)["devices"].items():
                raw[device] = raw.get(device, 0) + counts.get("received_bytes", 0)
    wire = device_wire_bytes(report)
    names = [r["row"] for r in rows]
    assert names and len(set(names)) == len(names), names
    assert set(names) <= set(raw), f"devices not in the run reports: {set(names) - set(raw)}"
    for row in rows:
        device, cells = row["row"], row["cells"]
        assert set(cells) == {"raw_bytes", "wire_bytes", "ratio"}, row
        same(cells["raw_bytes"], raw[device], f"ratio-devices {device} raw_bytes")
        out = wire.get(device, 0.0)
        same(cells["wire_bytes"], math.floor(out + 0.5), f"ratio-devices {device} wire_bytes")
        same(cells["ratio"], raw[device] / out if out else None, f"ratio-devices {device} ratio")
    # the top devices by raw bytes: none left out sent more than one shown
    least = min(raw[d] for d in names)
    assert [d for d in raw if d not in names and raw[d] > least] == []


def test_nothing_is_fetched_from_the_network(page: Browser, report: Report) -> None:
    html = report.html.read_text(encoding="utf-8")
    assert "<script src=" not in html and 'rel="stylesheet"' not in html
    assert page.outside_requests() == []
