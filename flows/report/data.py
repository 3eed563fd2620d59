"""What the report shows, read from an edge's data directory and a receiver's DuckDB file.

Everything is read with DuckDB: the Parquet streams under ``data_dir/parquet``
as views, the cloud file attached read-only as ``cloud``. Queries aggregate
and downsample in SQL and hand NumPy columns to the charts; no row becomes a
Python object. The run reports (``data_dir/report-*.json``) are read back
into :class:`~flows.accounting.FlowReport` so the summary is the text
report's own numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from flows.accounting import FlowReport
from operators.spectral import SpectralConfig

__all__ = [
    "STREAM_FLOWS",
    "Columns",
    "ReportData",
    "ReportError",
    "load",
    "load_reports",
]

Columns = dict[str, np.ndarray]
"""A query result: column name -> NumPy array (timestamps as ``datetime64[us]`` UTC)."""

STREAM_FLOWS: dict[str, str] = {
    "telemetry_points": "telemetry",
    "telemetry_summary": "telemetry",
    "telemetry_text": "telemetry",
    "device_attributes": "telemetry",
    "vibration_features": "vibration",
    "alarms": "vibration",
    "log_events": "logs",
    "log_summary": "logs",
}
"""The standard flow that writes each standard stream (others: the stream's own name)."""

NOT_REDUCED = ("dead_letters", "raw_readings")
"""Local streams that are not reduced output (the ratio leaves them out, as FlowReport does)."""

MAX_POINTS = 4000
"""Points per plotted line; longer series are aggregated into time buckets in SQL."""

MAX_KEPT_POINTS = 20_000
"""Deadband points shown per telemetry series (the newest ones)."""


class ReportError(ValueError):
    """The report cannot be made (a missing directory, no outputs, a bad cloud file)."""


@dataclass
class ReportData:
    """Everything the HTML page is drawn from."""

    data_dir: Path
    cloud: Path | None
    reports: dict[str, FlowReport]
    streams: list[str]
    edges: list[str] = field(default_factory=list)
    """The edge whose batches of the cloud file are reported (empty: none there)."""
    bytes_over_time: Columns = field(default_factory=dict)
    bytes_source: str = ""
    ratio_streams: Columns = field(default_factory=dict)
    ratio_devices: Columns = field(default_factory=dict)
    device_source: str = ""
    series: list[tuple[str, str]] = field(default_factory=list)
    points: Columns = field(default_factory=dict)
    summary_band: Columns = field(default_factory=dict)
    raw_readings: Columns = field(default_factory=dict)
    rms: Columns = field(default_factory=dict)
    rms_bucket_s: float | None = None
    band_energy: Columns = field(default_factory=dict)
    spectrum: Columns = field(default_factory=dict)
    alarms: Columns = field(default_factory=dict)
    dead_letters: Columns = field(default_factory=dict)
    iso_thresholds_mm_s: tuple[float, float, float] = SpectralConfig.iso_thresholds_mm_s
    bands_hz: tuple[tuple[float, float], ...] = SpectralConfig.bands_hz


def load_reports(data_dir: Path) -> dict[str, FlowReport]:
    """The run reports ``data_dir/report-<flow>.json`` as :class:`FlowReport`, by flow."""
    names = {f.name for f in fields(FlowReport)}
    out: dict[str, FlowReport] = {}
    for path in sorted(data_dir.glob("report-*.json")):
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            rep = FlowReport(**{k: v for k, v in body.items() if k in names})
        except (OSError, ValueError, TypeError) as exc:
            msg = (
                f"report: {path} is not a run report ({exc}); hint: it is written by the "
                "edge when a flow stops; move the file away to report without it"
            )
            raise ReportError(msg) from None
        out[rep.flow] = rep
    return out


def _sql_str(value: str | Path) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _columns(rel: duckdb.DuckDBPyRelation) -> Columns:
    """A relation's columns as NumPy arrays (masked values filled: NaN or empty)."""
    raw = rel.fetchnumpy()
    out: Columns = {}
    for name, values in raw.items():
        arr = np.ma.getdata(values) if isinstance(values, np.ma.MaskedArray) else values
        if isinstance(values, np.ma.MaskedArray) and values.mask is not np.ma.nomask:
            if arr.dtype.kind == "f":
                arr = np.where(values.mask, np.nan, arr)
            elif arr.dtype.kind in "iu":
                arr = np.where(values.mask, np.nan, arr.astype(float))
        out[name] = np.asarray(arr)
    return out


def _time(column: str) -> str:
    """A TIMESTAMPTZ column as naive UTC microseconds (NumPy ``datetime64[us]``)."""
    return f"make_timestamp(epoch_us({column}))"


class _Reader:
    """One in-memory DuckDB connection with a view per Parquet stream and the cloud attached."""

    def __init__(self, data_dir: Path, cloud: Path | None, edge_id: str | None) -> None:
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        self.streams: list[str] = []
        root = data_dir / "parquet"
        if root.is_dir():
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                if next(sub.rglob("*.parquet"), None) is None:
                    continue
                glob = _sql_str(sub / "**" / "*.parquet")
                self.con.execute(
                    f'CREATE VIEW "{sub.name}" AS SELECT * FROM read_parquet({glob}, '
                    "hive_partitioning = true, union_by_name = true, filename = true)"
                )
                self.streams.append(sub.name)
        self.cloud = cloud is not None
        self.edge_id: str | None = None
        if cloud is not None:
            self._attach(cloud)
            self._pick_edge(cloud, edge_id)

    def _pick_edge(self, cloud: Path, edge_id: str | None) -> None:
        """``batches``: the chosen edge's rows of ``uplink_batches`` (the only edge by default)."""
        edges = [
            e
            for (e,) in self.con.execute(
                "SELECT DISTINCT edge_id FROM cloud.uplink_batches ORDER BY 1"
            ).fetchall()
        ]
        if edge_id is None and len(edges) > 1:
            msg = (
                f"report: --cloud {cloud} holds batches of {len(edges)} edges "
                f"({', '.join(edges[:5])}{', ...' if len(edges) > 5 else ''}); "
                f"hint: name this data_dir's edge with --edge-id {edges[0]}"
            )
            raise ReportError(msg)
        if edge_id is not None and edge_id not in edges:
            msg = (
                f"report: --edge-id {edge_id}: no batch of that edge in --cloud {cloud} "
                f"(edges: {', '.join(edges[:5]) or 'none'}); hint: the edge_id of its edge.yaml"
            )
            raise ReportError(msg)
        self.edge_id = edge_id if edge_id is not None else (edges[0] if edges else None)
        where = f"WHERE edge_id = {_sql_str(self.edge_id)}" if self.edge_id is not None else ""
        self.con.execute(f"CREATE VIEW batches AS SELECT * FROM cloud.uplink_batches {where}")

    def _attach(self, cloud: Path) -> None:
        if not cloud.is_file():
            msg = (
                f"report: --cloud {cloud} does not exist; hint: give the receiver's database, "
                "the --db of `edgesieve cloud` (the demo's is data_dir/cloud.duckdb)"
            )
            raise ReportError(msg)
        with cloud.open("rb") as fh:
            header = fh.read(12)
        if header[8:12] != b"DUCK":
            msg = (
                f"report: --cloud {cloud} is not a DuckDB database (its first bytes are not "
                "DuckDB's header); hint: give the receiver's --db file, e.g. cloud.duckdb"
            )
            raise ReportError(msg)
        try:
            self.con.execute(f"ATTACH {_sql_str(cloud)} AS cloud (READ_ONLY)")
            tables = {
                name
                for (name,) in self.con.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_catalog = 'cloud'"
                ).fetchall()
            }
        except duckdb.Error as exc:
            first = str(exc).splitlines()[0]
            msg = (
                f"report: --cloud {cloud} is not a readable DuckDB database ({first}); hint: "
                "give the receiver's --db file, and stop the receiver first if it holds the lock"
            )
            raise ReportError(msg) from None
        if "uplink_batches" not in tables:
            msg = (
                f"report: --cloud {cloud} has no uplink_batches table (tables: "
                f"{', '.join(sorted(tables)) or 'none'}); hint: give the database the reference "
                "receiver (`edgesieve cloud --db`) writes"
            )
            raise ReportError(msg)
        self.cloud_tables = tables

    def has(self, stream: str) -> bool:
        return stream in self.streams

    def sql(self, query: str, params: Sequence[Any] | None = None) -> Columns:
        return _columns(self.con.sql(query, params=params))


def _flow_case(column: str) -> str:
    whens = " ".join(f"WHEN {_sql_str(s)} THEN {_sql_str(f)}" for s, f in STREAM_FLOWS.items())
    return f"CASE {column} {whens} ELSE {column} END"


def load(
    data_dir: Path,
    *,
    cloud: Path | None = None,
    edge_id: str | None = None,
    series: Sequence[str] = (),
    top: int = 10,
    iso_thresholds_mm_s: tuple[float, float, float] = SpectralConfig.iso_thresholds_mm_s,
    bands_hz: tuple[tuple[float, float], ...] = SpectralConfig.bands_hz,
) -> ReportData:
    """Read everything the report shows; :class:`ReportError` when there is nothing to show."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is not a directory" if data_dir.exists() else "does not exist"
        msg = (
            f"report: DATA_DIR {data_dir} {what}; hint: give the edge's data_dir (data_dir: "
            "in edge.yaml, or the outputs directory the demo printed)"
        )
        raise ReportError(msg)
    if top < 1:
        msg = f"report: --top must be at least 1 (got {top}); hint: --top 10"
        raise ReportError(msg)
    reports = load_reports(data_dir)
    reader = _Reader(data_dir, cloud, edge_id)
    if not reports and not reader.streams:
        msg = (
            f"report: {data_dir} holds no run report (report-*.json) and no Parquet output "
            "(parquet/<stream>/); hint: give the data_dir of an edge that has run, "
            "or run `edgesieve demo` first"
        )
        raise ReportError(msg)
    data = ReportData(
        data_dir=data_dir,
        cloud=cloud,
        reports=reports,
        streams=reader.streams,
        iso_thresholds_mm_s=iso_thresholds_mm_s,
        bands_hz=bands_hz,
    )
    _bytes(reader, data)
    _devices(reader, data, top)
    _telemetry(reader, data, series)
    _vibration(reader, data)
    _events(reader, data)
    reader.con.close()
    return data


def _bytes(reader: _Reader, data: ReportData) -> None:
    """Cumulative raw and wire bytes per flow over time, and the ratio per stream."""
    if reader.cloud:
        data.edges = [reader.edge_id] if reader.edge_id is not None else []
        data.bytes_source = (
            "the receiver's uplink_batches: raw and wire bytes of each batch at its received_at"
        )
        data.bytes_over_time = reader.sql(
            f"SELECT {_time('received_at')} AS t, {_flow_case('stream')} AS flow, "
            "sum(raw_bytes) OVER w AS raw_bytes, sum(wire_bytes) OVER w AS wire_bytes "
            "FROM batches "
            f"WINDOW w AS (PARTITION BY {_flow_case('stream')} ORDER BY received_at, batch_id "
            "ROWS UNBOUNDED PRECEDING) ORDER BY flow, t"
        )
        data.ratio_streams = reader.sql(
            "SELECT stream, count(*) AS batches, sum(rows)::BIGINT AS rows, "
            "sum(raw_bytes)::BIGINT AS raw_bytes, sum(wire_bytes)::BIGINT AS wire_bytes, "
            "sum(raw_bytes) / nullif(sum(wire_bytes), 0) AS ratio "
            "FROM batches GROUP BY stream ORDER BY stream"
        )
        return
    # Edge only: local output bytes over event time, from the Parquet files' sizes.
    data.bytes_source = (
        "the Parquet files: each file's size at the newest event time it holds (local output "
        "bytes); raw and wire bytes are run totals from the run reports (no --cloud given)"
    )
    parts = []
    for stream in reader.streams:
        spec_time = _time_column(reader, stream)
        if spec_time is None:
            continue
        parts.append(
            f"SELECT {_sql_str(stream)} AS stream, filename, max({spec_time}) AS t "
            f'FROM "{stream}" GROUP BY filename'
        )
    if parts:
        files = reader.sql(" UNION ALL ".join(parts))
        sizes = np.array([Path(f).stat().st_size for f in files["filename"]], dtype=np.int64)
        reader.con.register(
            "files",
            {"stream": files["stream"], "t": files["t"], "nbytes": sizes},
        )
        data.bytes_over_time = reader.sql(
            f"SELECT {_time('t')} AS t, {_flow_case('stream')} AS flow, "
            "sum(nbytes) OVER (PARTITION BY "
            f"{_flow_case('stream')} ORDER BY t, stream ROWS UNBOUNDED PRECEDING) AS local_bytes "
            f"FROM files WHERE stream NOT IN {NOT_REDUCED!r} ORDER BY flow, t"
        )
    streams = sorted({s for r in data.reports.values() for s in (*r.output_rows, *r.wire_rows)})
    flows = {s: r.flow for r in data.reports.values() for s in (*r.output_rows, *r.wire_rows)}
    data.ratio_streams = {
        "stream": np.array(streams, dtype=object),
        "flow": np.array([flows[s] for s in streams], dtype=object),
        "rows": np.array([data.reports[flows[s]].output_rows.get(s, 0) for s in streams]),
        "local_bytes": np.array([data.reports[flows[s]].output_bytes.get(s, 0) for s in streams]),
        "wire_rows": np.array([data.reports[flows[s]].wire_rows.get(s, 0) for s in streams]),
        "wire_bytes": np.array([data.reports[flows[s]].wire_bytes.get(s, 0) for s in streams]),
    }


def _time_column(reader: _Reader, stream: str) -> str | None:
    from connectors.streams import STREAMS

    spec = STREAMS.get(stream)
    if spec is not None:
        return spec.time_column
    cols = reader.con.execute(f'DESCRIBE "{stream}"').fetchall()
    for name, kind, *_ in cols:
        if kind.startswith("TIMESTAMP"):
            return str(name)
    return None


def _devices(reader: _Reader, data: ReportData, top: int) -> None:
    """Top devices by raw bytes; output bytes shared out to devices by their rows."""
    raw: dict[str, int] = {}
    for rep in data.reports.values():
        for device, counts in rep.devices.items():
            raw[device] = raw.get(device, 0) + int(counts.get("received_bytes", 0))
    if not raw:
        return
    reader.con.register(
        "device_raw",
        {
            "device": np.array(list(raw), dtype=object),
            "raw_bytes": np.array(list(raw.values()), dtype=np.int64),
        },
    )
    if reader.cloud:
        data.device_source = (
            "raw bytes: the edge's run reports; wire bytes: each uplink batch's wire_bytes "
            "shared out to its rows (joined on batch_id), summed per device"
        )
        parts = [
            f'SELECT t.device, b.wire_bytes / b.rows AS share FROM cloud."{table}" t '
            "JOIN batches b ON t.batch_id = b.batch_id AND t.edge_id = b.edge_id"
            for table in sorted(reader.cloud_tables)
            if table not in ("uplink_batches", "uplink_refusals")
            and _has_device(reader, f'cloud."{table}"')
        ]
        out_col = "wire_bytes"
    else:
        data.device_source = (
            "raw bytes: the edge's run reports; output bytes: each stream's local bytes "
            "(run report) shared out to its Parquet rows, summed per device"
        )
        per_row = {
            s: rep.output_bytes[s] / rep.output_rows[s]
            for rep in data.reports.values()
            for s in rep.output_rows
            if rep.output_rows[s] and s not in NOT_REDUCED
        }
        parts = [
            f'SELECT device, {per_row[s]!r} AS share FROM "{s}"'
            for s in reader.streams
            if s in per_row and _has_device(reader, f'"{s}"')
        ]
        out_col = "local_bytes"
    shares = " UNION ALL ".join(parts) if parts else "SELECT NULL::VARCHAR AS device, 0.0 AS share"
    data.ratio_devices = reader.sql(
        f"WITH o AS (SELECT device, sum(share) AS out FROM ({shares}) GROUP BY device) "
        f"SELECT r.device, r.raw_bytes, round(coalesce(o.out, 0))::BIGINT AS {out_col}, "
        "r.raw_bytes / nullif(o.out, 0) AS ratio "
        "FROM device_raw r LEFT JOIN o USING (device) "
        f"ORDER BY r.raw_bytes DESC, r.device LIMIT {int(top)}"
    )


def _has_device(reader: _Reader, relation: str) -> bool:
    """Whether the table or view (a quoted, possibly qualified name) has a device column."""
    return any(row[0] == "device" for row in reader.con.execute(f"DESCRIBE {relation}").fetchall())


def _telemetry(reader: _Reader, data: ReportData, series: Sequence[str]) -> None:
    """The chosen series (default: the busiest three): kept points, window band, raw readings."""
    has_points, has_summary = reader.has("telemetry_points"), reader.has("telemetry_summary")
    if not (has_points or has_summary):
        if series:
            msg = (
                f"report: --series {series[0]}: {data.data_dir} has no telemetry_points or "
                "telemetry_summary output; hint: leave --series out"
            )
            raise ReportError(msg)
        return
    counts = (
        'SELECT device, key, sum("count") AS n FROM telemetry_summary GROUP BY ALL'
        if has_summary
        else "SELECT device, key, count(*) AS n FROM telemetry_points GROUP BY ALL"
    )
    if series:
        chosen: list[tuple[str, str]] = []
        for item in series:
            device, sep, key = item.rpartition("/")
            if not sep or not device or not key:
                msg = (
                    f"report: --series {item!r} is not DEVICE/KEY; hint: --series "
                    "sensor-000/temperature"
                )
                raise ReportError(msg)
            found = reader.con.execute(
                f"SELECT count(*) FROM ({counts}) WHERE device = ? AND key = ?", [device, key]
            ).fetchall()[0][0]
            if not found:
                (example,) = reader.con.execute(
                    f"SELECT device || '/' || key FROM ({counts}) ORDER BY n DESC LIMIT 1"
                ).fetchall() or [("none",)]
                msg = (
                    f"report: --series {item}: no such device/key in the telemetry outputs; "
                    f"hint: the busiest is {example[0]}"
                )
                raise ReportError(msg)
            chosen.append((device, key))
    else:
        chosen = [
            (d, k)
            for d, k, _ in reader.con.execute(
                f"SELECT device, key, n FROM ({counts}) ORDER BY n DESC, device, key LIMIT 3"
            ).fetchall()
        ]
    data.series = chosen
    reader.con.register(
        "chosen",
        {
            "device": np.array([d for d, _ in chosen], dtype=object),
            "key": np.array([k for _, k in chosen], dtype=object),
        },
    )
    if has_points:
        data.points = reader.sql(
            f"SELECT device, key, {_time('ts')} AS ts, value FROM ("
            "SELECT p.device, p.key, p.ts, p.value, row_number() OVER "
            "(PARTITION BY p.device, p.key ORDER BY p.ts DESC) AS newest "
            "FROM telemetry_points p JOIN chosen USING (device, key)) "
            f"WHERE newest <= {MAX_KEPT_POINTS} ORDER BY device, key, ts"
        )
    if has_summary:
        data.summary_band = reader.sql(
            f"SELECT device, key, {_time('window_start')} AS window_start, "
            f'{_time("window_end")} AS window_end, "count", mean, "min", "max" '
            "FROM telemetry_summary JOIN chosen USING (device, key) "
            "ORDER BY device, key, window_start"
        )
    if reader.has("raw_readings"):
        data.raw_readings = reader.sql(
            f"SELECT device, key, {_time('ts')} AS ts, value FROM ("
            "SELECT r.device, r.key, r.ts, r.value, row_number() OVER "
            "(PARTITION BY r.device, r.key ORDER BY r.ts DESC) AS newest "
            "FROM raw_readings r JOIN chosen USING (device, key)) "
            f"WHERE newest <= {MAX_KEPT_POINTS} ORDER BY device, key, ts"
        )


def _vibration(reader: _Reader, data: ReportData) -> None:
    """Velocity RMS over time (bucketed when long), band energies, the latest row per machine."""
    if not reader.has("vibration_features"):
        return
    span, longest = reader.con.execute(
        "SELECT epoch(max(ts)) - epoch(min(ts)), max(n) FROM "
        "(SELECT device, axis, count(*) AS n, min(ts) AS ts FROM vibration_features "
        "GROUP BY ALL UNION ALL SELECT NULL, NULL, NULL, max(ts) FROM vibration_features)"
    ).fetchall()[0]
    if longest and longest > MAX_POINTS and span:
        bucket = max(1.0, float(span) / MAX_POINTS)
        data.rms_bucket_s = bucket
        t = f"time_bucket(to_microseconds({int(bucket * 1e6)}), ts)"
        data.rms = reader.sql(
            f"SELECT device, axis, {_time(t)} AS ts, max(velocity_rms_mm_s) AS velocity_rms_mm_s "
            "FROM vibration_features GROUP BY device, axis, 3 ORDER BY device, axis, ts"
        )
        energy_time = t
    else:
        data.rms = reader.sql(
            f"SELECT device, axis, {_time('ts')} AS ts, velocity_rms_mm_s "
            "FROM vibration_features ORDER BY device, axis, ts"
        )
        energy_time = "ts"
    data.band_energy = reader.sql(
        f"SELECT device, band, {_time(energy_time)} AS ts, avg(energy) AS energy FROM ("
        "SELECT device, ts, unnest(band_energy) AS energy, "
        "generate_subscripts(band_energy, 1) AS band FROM vibration_features) "
        "GROUP BY device, band, 3 ORDER BY device, band, ts"
    )
    data.spectrum = reader.sql(
        f"SELECT device, axis, {_time('ts')} AS ts, band_energy, dominant_hz, "
        "velocity_rms_mm_s, iso_zone FROM vibration_features "
        "QUALIFY ts = max(ts) OVER (PARTITION BY device) ORDER BY device, axis"
    )


def _events(reader: _Reader, data: ReportData) -> None:
    """Alarms in time order and dead letters by reason (numbers in reasons folded to N)."""
    if reader.has("alarms"):
        data.alarms = reader.sql(
            f"SELECT device, {_time('ts')} AS ts, rule, state, severity, value, "
            "coalesce(key, '') AS key FROM alarms ORDER BY ts, device, rule"
        )
    if reader.has("dead_letters"):
        data.dead_letters = reader.sql(
            "SELECT regexp_replace(left(reason, 200), '[0-9]+([.:-][0-9]+)*', 'N', 'g') AS reason, "
            "count(*) AS n FROM dead_letters GROUP BY 1 ORDER BY n DESC, reason"
        )


def flow_totals(reports: Mapping[str, FlowReport]) -> dict[str, dict[str, float | int | None]]:
    """Per flow, the numbers of the summary table (the text report's figures)."""
    out: dict[str, dict[str, float | int | None]] = {}
    for name, rep in sorted(reports.items()):
        out[name] = {
            "messages_in": rep.messages_in,
            "raw_bytes": rep.raw_bytes,
            "rows_out": sum(n for s, n in rep.output_rows.items() if s not in NOT_REDUCED),
            "output_bytes": rep.reduced_bytes(),
            "wire_bytes": sum(rep.wire_bytes.values()),
            "ratio": rep.ratio,
            "wire_ratio": rep.wire_ratio,
            "dead_letters": rep.output_rows.get("dead_letters", 0),
            "alarms": rep.stages.get("alarms", 0),
        }
    return out
