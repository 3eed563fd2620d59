"""``edgesieve report``: the HTML page made from a real flow run and a real cloud receiver.

The data directory comes from recorded device messages (telemetry JSON, EVB1
blocks of a healthy, an imbalanced and a bearing-fault machine, malformed
payloads) run through ``flows.edge`` on an Edge into Parquet and a real
``CloudReceiver`` over gRPC (``benchmarks/bench_report.make_data_dir``). The
page is read back with the standard library's HTML parser.
"""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest

from benchmarks.bench_report import Made, make_data_dir
from flows.cli import EXIT_CONFIG, main
from flows.report import CHARTS, ReportError, build_report
from flows.report.data import flow_totals


class Page(HTMLParser):
    """Charts (name -> attributes, inner plot div id) and tables (id -> rows) of a report."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, str | None]] = {}
        self.plots: dict[str, str] = {}
        self.tables: dict[str, list[tuple[dict[str, str | None], dict[str, str]]]] = {}
        self.pre: dict[str, str] = {}
        self._chart: str | None = None
        self._table: str | None = None
        self._row: tuple[dict[str, str | None], dict[str, str]] | None = None
        self._pre: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "div" and "data-chart" in a:
            self._chart = str(a["data-chart"])
            self.charts[self._chart] = a
        elif tag == "div" and self._chart and str(a.get("id", "")).startswith("plot-"):
            self.plots[self._chart] = str(a["id"])
        elif tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = []
        elif tag == "tr" and self._table and any(k.startswith("data-") for k in a):
            self._row = (a, {})
            self.tables[self._table].append(self._row)
        elif tag == "td" and self._row is not None and "data-field" in a:
            self._row[1][str(a["data-field"])] = str(a["data-value"])
        elif tag == "pre":
            self._pre = str(a.get("id"))
            self.pre[self._pre] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        elif tag == "tr":
            self._row = None
        elif tag == "pre":
            self._pre = None

    def handle_data(self, data: str) -> None:
        if self._pre is not None:
            self.pre[self._pre] += data


def _num(text: str) -> float | None:
    return float(text) if text else None


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Made:
    return make_data_dir(tmp_path_factory.mktemp("report"), minutes=3, sensors=4, machines=3)


@pytest.fixture(scope="module")
def cloud_page(made, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("page") / "report.html"
    build_report(made.data_dir, out, cloud=made.cloud)
    return out, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def edge_page(made) -> str:
    return build_report(made.data_dir).read_text(encoding="utf-8")


@pytest.mark.parametrize("which", ["cloud", "edge"])
def test_every_chart_is_drawn_with_data(which, cloud_page, edge_page):
    text = cloud_page[1] if which == "cloud" else edge_page
    page = Page(text)
    assert list(page.charts) == list(CHARTS)
    for name, attrs in page.charts.items():
        assert "data-empty" not in attrs, name
        assert page.plots[name] == f"plot-{name}"
        assert re.search(rf'"plot-{name}",\s*\[\{{"', text), name  # at least one trace
    assert text.count("Plotly.newPlot(") == len(CHARTS)


def test_page_is_self_contained(cloud_page, edge_page):
    for text in (cloud_page[1], edge_page):
        assert 'src="http' not in text and "src='http" not in text
        assert 'href="http' not in text and "href='http" not in text
        assert "<script src" not in text and '<link rel="stylesheet"' not in text
        assert text.count("plotly.js v") >= 1  # the library itself is inlined
        assert len(text) > 3_000_000


def test_summary_table_is_the_text_report(made, cloud_page):
    page = Page(cloud_page[1])
    rows = {str(attrs["data-flow"]): cells for attrs, cells in page.tables["summary"]}
    assert set(rows) == set(made.reports) == {"telemetry", "vibration"}
    for flow, rep in made.reports.items():
        cells = rows[flow]
        assert int(cells["messages_in"]) == rep.messages_in
        assert int(cells["raw_bytes"]) == rep.raw_bytes
        assert int(cells["output_bytes"]) == rep.reduced_bytes()
        assert int(cells["wire_bytes"]) == sum(rep.wire_bytes.values())
        assert _num(cells["ratio"]) == rep.ratio
        assert _num(cells["wire_ratio"]) == rep.wire_ratio
        assert int(cells["dead_letters"]) == rep.output_rows.get("dead_letters", 0)
        assert int(cells["alarms"]) == rep.stages.get("alarms", 0)
        assert {k: _num(v) for k, v in cells.items()} == flow_totals({flow: rep})[flow]
    streams = {str(a["data-stream"]): c for a, c in page.tables["summary-streams"]}
    for flow, rep in made.reports.items():
        for stream, n in rep.output_rows.items():
            assert int(streams[f"{flow}/{stream}"]["rows"]) == n
            assert int(streams[f"{flow}/{stream}"]["bytes"]) == rep.output_bytes[stream]
    text = "\n".join(made.reports[f].render() for f in sorted(made.reports))
    assert page.pre["text-report"] == text
    # what the run printed is also what the report-*.json files say
    for flow, rep in made.reports.items():
        saved = json.loads((made.data_dir / f"report-{flow}.json").read_text())
        assert saved["raw_bytes"] == rep.raw_bytes


def test_ratio_tables_equal_sql_over_uplink_batches(made, cloud_page):
    page = Page(cloud_page[1])
    with duckdb.connect(str(made.cloud), read_only=True) as con:
        expected = {
            s: (b, r, raw, wire, raw / wire)
            for s, b, r, raw, wire in con.sql(
                "select stream, count(*), sum(rows), sum(raw_bytes), sum(wire_bytes) "
                "from uplink_batches group by stream"
            ).fetchall()
        }
        wire_by_device = dict(
            con.sql(
                "select device, sum(share) from ("
                "select t.device, b.wire_bytes / b.rows as share from telemetry_summary t "
                "join uplink_batches b using (batch_id) union all "
                "select t.device, b.wire_bytes / b.rows from vibration_features t "
                "join uplink_batches b using (batch_id) union all "
                "select t.device, b.wire_bytes / b.rows from alarms t "
                "join uplink_batches b using (batch_id)) group by device"
            ).fetchall()
        )
    got = {
        str(a["data-stream"]): (
            int(c["batches"]),
            int(c["rows"]),
            int(c["raw_bytes"]),
            int(c["wire_bytes"]),
            float(c["ratio"]),
        )
        for a, c in page.tables["ratio-streams"]
    }
    assert got == expected
    assert {"telemetry_summary", "vibration_features", "alarms"} <= set(got)

    raw = {}
    for rep in made.reports.values():
        for device, counts in rep.devices.items():
            raw[device] = raw.get(device, 0) + counts.get("received_bytes", 0)
    devices = page.tables["ratio-devices"]
    assert len(devices) == min(10, len(raw))
    shown = [str(a["data-device"]) for a, _ in devices]
    assert shown == sorted(raw, key=lambda d: (-raw[d], d))[:10]
    for attrs, cells in devices:
        device = str(attrs["data-device"])
        assert int(cells["raw_bytes"]) == raw[device]
        assert int(cells["wire_bytes"]) == round(wire_by_device[device])
        assert float(cells["ratio"]) == pytest.approx(raw[device] / wire_by_device[device])


def test_edge_only_ratios_come_from_the_run_reports(made, edge_page):
    page = Page(edge_page)
    rows = {str(a["data-stream"]): c for a, c in page.tables["ratio-streams"]}
    for rep in made.reports.values():
        for stream, n in rep.output_rows.items():
            assert int(rows[stream]["rows"]) == n
            assert int(rows[stream]["local_bytes"]) == rep.output_bytes[stream]
            assert int(rows[stream]["wire_bytes"]) == rep.wire_bytes.get(stream, 0)
    assert "no cloud database (--cloud)" in edge_page


def _title(series: str) -> str:
    """A subplot title in plotly's JSON (which writes / as \\u002f)."""
    return '"text":"' + series.replace("/", "\\u002f") + '"'


def test_busiest_series_by_default_and_chosen_series(made, tmp_path):
    glob = str(made.data_dir / "parquet" / "telemetry_summary" / "**" / "*.parquet")
    busiest = duckdb.sql(
        f"select device || '/' || key from read_parquet('{glob}') group by device, key "
        "order by sum(count) desc, device, key limit 3"
    ).fetchall()
    text = build_report(made.data_dir, tmp_path / "all.html").read_text(encoding="utf-8")
    for (name,) in busiest:
        assert _title(name) in text  # the subplot titles
    out = build_report(made.data_dir, tmp_path / "one.html", series=["sensor-003/humidity"])
    one = out.read_text(encoding="utf-8")
    assert _title("sensor-003/humidity") in one
    assert sum(_title(name) in one for (name,) in busiest if name != "sensor-003/humidity") == 0


def test_charts_without_data_say_so(made, tmp_path):
    data_dir = tmp_path / "telemetry-only"
    shutil.copytree(made.data_dir / "parquet", data_dir / "parquet")
    shutil.copy(made.data_dir / "report-telemetry.json", data_dir)
    for stream in ("vibration_features", "alarms", "dead_letters"):
        shutil.rmtree(data_dir / "parquet" / stream)
    page = Page(build_report(data_dir).read_text(encoding="utf-8"))
    empty = {n for n, a in page.charts.items() if a.get("data-empty") == "true"}
    assert empty == {"vibration-rms", "band-energy", "spectrum", "alarms-timeline", "dead-letters"}
    assert set(page.plots) == set(CHARTS) - empty
    text = (data_dir / "report.html").read_text(encoding="utf-8")
    assert "no data: no vibration_features output" in text
    assert "no data: no alarms in this run" in text


def test_cli_writes_the_report(made, tmp_path, capsys):
    out = tmp_path / "r.html"
    code = main(["report", str(made.data_dir), "--cloud", str(made.cloud), "--out", str(out)])
    assert code == 0
    assert out.is_file()
    printed = capsys.readouterr().out
    assert f"report: {out} (" in printed and "open it in a browser" in printed


def test_cli_takes_iso_thresholds_from_the_config(made, tmp_path, capsys):
    config = tmp_path / "edge.yaml"
    config.write_text("vibration:\n  iso_thresholds_mm_s: [2.3, 4.5, 7.1]\n")
    out = tmp_path / "r.html"
    assert main(["report", str(made.data_dir), "--config", str(config), "--out", str(out)]) == 0
    assert "zones A/B/C/D at 2.3/4.5/7.1 mm/s" in out.read_text(encoding="utf-8")


def _bad_cases(made: Made, tmp: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty"
    empty.mkdir()
    not_db = tmp / "notes.txt"
    not_db.write_text("hello, not a database at all\n")
    edge_db = made.data_dir / "edge.duckdb"
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "report-telemetry.json").write_text("{not json")
    return [
        (
            [str(tmp / "missing")],
            f"report: DATA_DIR {tmp / 'missing'} does not exist; hint: give the edge's data_dir",
        ),
        ([str(not_db)], f"report: DATA_DIR {not_db} is not a directory; hint:"),
        (
            [str(empty)],
            f"report: {empty} holds no run report (report-*.json) and no Parquet output "
            "(parquet/<stream>/); hint: give the data_dir of an edge that has run",
        ),
        (
            [str(made.data_dir), "--cloud", str(tmp / "nope.duckdb")],
            f"report: --cloud {tmp / 'nope.duckdb'} does not exist; hint: give the receiver's "
            "database",
        ),
        (
            [str(made.data_dir), "--cloud", str(not_db)],
            f"report: --cloud {not_db} is not a DuckDB database (its first bytes are not "
            "DuckDB's header); hint:",
        ),
        (
            [str(made.data_dir), "--cloud", str(edge_db)],
            f"report: --cloud {edge_db} has no uplink_batches table (tables: alarms,",
        ),
        (
            [str(made.data_dir), "--series", "temperature"],
            "report: --series 'temperature' is not DEVICE/KEY; hint: --series "
            "sensor-000/temperature",
        ),
        (
            [str(made.data_dir), "--series", "pump-99/pressure"],
            "report: --series pump-99/pressure: no such device/key in the telemetry outputs; "
            "hint: the busiest is sensor-",
        ),
        ([str(made.data_dir), "--top", "0"], "report: --top must be at least 1 (got 0)"),
        (
            [str(broken)],
            f"report: {broken / 'report-telemetry.json'} is not a run report (",
        ),
        (
            [str(made.data_dir), "--out", str(tmp / "no-such-dir" / "r.html")],
            f"report: cannot write {tmp / 'no-such-dir' / 'r.html'} (No such file or directory); "
            "hint: give --out a path in a writable directory",
        ),
    ]


def test_cli_errors_are_one_line_with_a_hint(made, tmp_path, capsys):
    for args, expected in _bad_cases(made, tmp_path):
        code = main(["report", *args])
        err = capsys.readouterr().err
        assert code == EXIT_CONFIG, args
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"edgesieve: error: {expected}"), (args, err)
        assert "hint:" in lines[0]


def test_series_needs_telemetry_output(made, tmp_path):
    data_dir = tmp_path / "vibration-only"
    shutil.copytree(made.data_dir / "parquet" / "vibration_features", data_dir / "parquet" / "v")
    (data_dir / "parquet" / "v").rename(data_dir / "parquet" / "vibration_features")
    with pytest.raises(ReportError, match=r"--series a/b: .* has no telemetry_points or "):
        build_report(data_dir, series=["a/b"])


def test_raw_readings_are_kept_locally_and_drawn(made, cloud_page):
    """``sinks.raw_readings: true``: every reading in Parquet, none in the cloud, not in the ratio."""
    rep = made.reports["telemetry"]
    glob = str(made.data_dir / "parquet" / "raw_readings" / "**" / "*.parquet")
    (rows,) = duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0]
    assert rows == rep.stages["readings"] == rep.output_rows["raw_readings"]
    with duckdb.connect(str(made.cloud), read_only=True) as con:
        tables = {t for (t,) in con.sql("show tables").fetchall()}
        streams = {s for (s,) in con.sql("select distinct stream from uplink_batches").fetchall()}
    assert "raw_readings" not in tables and "raw_readings" not in streams
    reduced = sum(
        n for s, n in rep.output_bytes.items() if s not in ("dead_letters", "raw_readings")
    )
    assert rep.ratio == rep.raw_bytes / reduced
    text = cloud_page[1]
    assert '"name":"raw readings"' in text
    assert "grey: every raw reading" in text


def test_a_cloud_of_several_edges_needs_the_edge_id(made, tmp_path, capsys):
    cloud = tmp_path / "cloud.duckdb"
    shutil.copy(made.cloud, cloud)
    with duckdb.connect(str(cloud)) as con:
        con.execute(
            "insert into uplink_batches select * replace ('other-edge' as edge_id, "
            "raw_bytes * 1000 as raw_bytes) from uplink_batches"
        )
    args = ["report", str(made.data_dir), "--cloud", str(cloud), "--out", str(tmp_path / "r.html")]
    assert main(args) == EXIT_CONFIG
    assert capsys.readouterr().err.strip() == (
        f"edgesieve: error: report: --cloud {cloud} holds batches of 2 edges (demo-edge, "
        "other-edge); hint: name this data_dir's edge with --edge-id demo-edge"
    )
    assert main([*args, "--edge-id", "edge-9"]) == EXIT_CONFIG
    assert capsys.readouterr().err.strip() == (
        f"edgesieve: error: report: --edge-id edge-9: no batch of that edge in --cloud {cloud} "
        "(edges: demo-edge, other-edge); hint: the edge_id of its edge.yaml"
    )
    config = tmp_path / "edge.yaml"
    config.write_text("edge_id: demo-edge\n")
    for more in (["--edge-id", "demo-edge"], ["--config", str(config)]):
        assert main([*args, *more]) == 0
        page = Page((tmp_path / "r.html").read_text(encoding="utf-8"))
        got = {str(a["data-stream"]): int(c["raw_bytes"]) for a, c in page.tables["ratio-streams"]}
        with duckdb.connect(str(made.cloud), read_only=True) as con:
            assert got == dict(
                con.sql("select stream, sum(raw_bytes) from uplink_batches group by 1").fetchall()
            )
