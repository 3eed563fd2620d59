"""The report page: plotly charts and plain tables in one self-contained HTML file.

plotly.js is inlined once in the head; each chart is a ``full_html=False``
plotly div inside ``<div class="chart" data-chart="NAME">``. A chart without
data is a ``data-empty="true"`` div with a note, never an empty plot. Every
number in a table carries ``data-value``: the exact number it shows.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from functools import cache
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.offline

from flows.accounting import ratio_text
from flows.report.charts import (
    alarms,
    band_energy,
    dead_letters,
    ratio_devices,
    ratio_streams,
    raw_wire,
    rms,
    spectrum,
    telemetry,
)
from flows.report.data import MAX_KEPT_POINTS, ReportData, flow_totals

__all__ = ["CHARTS", "render"]

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
"""Every chart of the page, in page order (``data-chart`` names)."""


_CONFIG = {"displaylogo": False, "responsive": True}

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 2rem;color:#222}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin:2rem 0 .3rem}
.meta,.note{color:#555;font-size:.9rem;margin:.2rem 0}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border-bottom:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
.chart{min-height:2rem}.chart[data-empty=true]{background:#fafafa;border:1px dashed #bbb;
padding:1rem;color:#666}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.85rem}
"""


@cache
def _plotly_js() -> str:
    r"""plotly.js, with the attribution links' ``href="https://`` spelled so no URL is literal.

    ``\x68`` is ``h`` in a JavaScript string or regular expression, so the
    code is unchanged; the page just holds no ``href="http`` a checker could
    mistake for a resource it loads (it loads none).
    """
    js = plotly.offline.get_plotlyjs()
    return re.sub(r"""((?:src|href)=\\?["'])http""", r"\1\\x68ttp", js)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    """``data-value``: integers as integers, floats exactly (repr), missing as empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return repr(value)
    return repr(value) if isinstance(value, float) else str(int(value))


def _shown(value: Any, *, ratio: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    if isinstance(value, np.generic):
        value = value.item()
    if ratio:
        return ratio_text(float(value))
    if isinstance(value, float):
        return f"{value:,.3g}"
    return f"{int(value):,}"


def _cell(field: str, value: Any, *, ratio: bool = False) -> str:
    return (
        f'<td data-field="{field}" data-value="{_number(value)}">'
        f"{_esc(_shown(value, ratio=ratio))}</td>"
    )


def _table(
    table_id: str,
    headers: Sequence[str],
    key_attr: str,
    rows: Iterable[tuple[str, Sequence[tuple[str, Any, bool]]]],
) -> str:
    """``rows``: (key, [(field, value, is_ratio), ...]); the first column shows the key."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for key, cells in rows:
        tds = "".join(_cell(f, v, ratio=r) for f, v, r in cells)
        body.append(f'<tr data-{key_attr}="{_esc(key)}"><td>{_esc(key)}</td>{tds}</tr>')
    if not body:
        body.append(f'<tr class="empty"><td colspan="{len(headers)}">no data</td></tr>')
    tbody = "".join(body)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{tbody}</tbody></table>'


def _chart(name: str, fig: go.Figure | None, empty: str) -> str:
    if fig is None:
        return (
            f'<div class="chart" data-chart="{name}" data-empty="true">'
            f'<p class="empty">no data: {_esc(empty)}</p></div>'
        )
    fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 40, "b": 50})
    div = fig.to_html(
        full_html=False, include_plotlyjs=False, config=_CONFIG, div_id=f"plot-{name}"
    )
    return f'<div class="chart" data-chart="{name}">{div}</div>'


def _section(title: str, note: str, *parts: str) -> str:
    text = f'<p class="note">{_esc(note)}</p>' if note else ""
    return f"<section><h2>{_esc(title)}</h2>{text}{''.join(parts)}</section>"


def _summary(data: ReportData) -> str:
    totals = flow_totals(data.reports)
    ratios = {"ratio", "wire_ratio"}
    rows = [
        (flow, [(f, v, f in ratios) for f, v in numbers.items()])
        for flow, numbers in totals.items()
    ]
    summary = _table(
        "summary",
        [
            "flow",
            "messages in",
            "raw bytes",
            "rows out",
            "output bytes",
            "wire bytes",
            "raw / output",
            "raw / wire",
            "dead letters",
            "alarms",
        ],
        "flow",
        rows,
    )
    stream_rows = []
    for flow, rep in sorted(data.reports.items()):
        for stream in sorted({*rep.output_rows, *rep.wire_rows}):
            stream_rows.append(
                (
                    f"{flow}/{stream}",
                    [
                        ("rows", rep.output_rows.get(stream, 0), False),
                        ("bytes", rep.output_bytes.get(stream, 0), False),
                        ("wire_rows", rep.wire_rows.get(stream, 0), False),
                        ("wire_bytes", rep.wire_bytes.get(stream, 0), False),
                    ],
                )
            )
    streams = _table(
        "summary-streams",
        ["flow/stream", "rows", "bytes", "cloud rows", "wire bytes"],
        "stream",
        stream_rows,
    )
    text = "\n".join(rep.render() for _, rep in sorted(data.reports.items()))
    pre = (
        f'<details><summary>text report</summary><pre id="text-report">{_esc(text)}</pre></details>'
    )
    return summary + streams + pre


def _ratio_stream_table(data: ReportData) -> str:
    cols = data.ratio_streams
    if data.cloud is not None:
        fields = ("batches", "rows", "raw_bytes", "wire_bytes", "ratio")
        headers = ["stream", "batches", "rows", "raw bytes", "wire bytes", "raw / wire"]
    else:
        fields = ("rows", "local_bytes", "wire_rows", "wire_bytes")
        headers = ["stream", "rows", "local bytes", "cloud rows", "wire bytes"]
    n = len(cols["stream"]) if cols else 0
    rows = [
        (str(cols["stream"][i]), [(f, cols[f][i], f == "ratio") for f in fields]) for i in range(n)
    ]
    return _table("ratio-streams", headers, "stream", rows)


def _ratio_device_table(data: ReportData) -> str:
    cols = data.ratio_devices
    out = "wire_bytes" if cols and "wire_bytes" in cols else "local_bytes"
    n = len(cols["device"]) if cols else 0
    rows = [
        (
            str(cols["device"][i]),
            [(f, cols[f][i], f == "ratio") for f in ("raw_bytes", out, "ratio")],
        )
        for i in range(n)
    ]
    headers = ["device", "raw bytes", out.replace("_", " "), "raw / out"]
    return _table("ratio-devices", headers, "device", rows)


def render(data: ReportData, *, generated_at: datetime | None = None) -> str:
    """The whole page."""
    when = (generated_at or datetime.now(UTC)).isoformat(timespec="seconds")
    cloud = (
        f"cloud database {data.cloud} (edge {', '.join(data.edges) or 'none'})"
        if data.cloud is not None
        else "no cloud database (--cloud): ratios from the edge's run reports"
    )
    raw_note = (
        "grey: every raw reading (the local-only raw_readings stream)"
        if data.raw_readings
        else "raw readings are not stored by the edge; the window min/max band is their envelope"
    )
    bucket = (
        f"; lines show the maximum per {data.rms_bucket_s:.0f} s bucket"
        if data.rms_bucket_s
        else ""
    )
    iso = "/".join(f"{t:g}" for t in data.iso_thresholds_mm_s)
    sections = [
        _section(
            "Summary (the text report's numbers)",
            "ratio = raw device bytes / local output bytes (dead letters excluded); "
            "raw / wire = raw device bytes / bytes sent to the cloud",
            _summary(data),
        ),
        _section(
            "Raw vs wire bytes over time",
            f"from {data.bytes_source}",
            _chart("raw-wire-over-time", raw_wire(data), "no run report or output over time"),
        ),
        _section(
            "Ratio per stream",
            "from the receiver's uplink_batches"
            if data.cloud is not None
            else "from the edge's run reports (raw bytes are counted per flow: see the summary)",
            _chart("ratio-by-stream", ratio_streams(data), "no stream was written"),
            _ratio_stream_table(data),
        ),
        _section(
            "Ratio per device (top by raw bytes)",
            data.device_source,
            _chart("ratio-by-device", ratio_devices(data), "no device bytes in the run reports"),
            _ratio_device_table(data),
        ),
        _section(
            "Telemetry: kept points against the window band",
            f"kept deadband points (telemetry_points, held until the next one) over the window "
            f"mean and min/max (telemetry_summary); {raw_note}; at most the newest "
            f"{MAX_KEPT_POINTS:,} points and raw readings per series",
            _chart("telemetry-series", telemetry(data), "no telemetry output"),
        ),
        _section(
            "Vibration: velocity RMS per machine and axis",
            f"ISO 10816 zones A/B/C/D at {iso} mm/s; alarms as black marks{bucket}",
            _chart("vibration-rms", rms(data), "no vibration_features output"),
        ),
        _section(
            "Vibration: band energies",
            "energy per configured band, mean of the axes",
            _chart("band-energy", band_energy(data), "no vibration_features output"),
        ),
        _section(
            "Vibration: spectrum of the latest frame per machine",
            "the edge stores no full spectrum: bars are the band energies of each machine's "
            "latest feature row, per axis, with its dominant frequency",
            _chart("spectrum", spectrum(data), "no vibration_features output"),
        ),
        _section(
            "Alarms",
            "raised (triangle) and cleared (circle) per device and rule",
            _chart("alarms-timeline", alarms(data), "no alarms in this run"),
        ),
        _section(
            "Dead letters by reason",
            "numbers in reasons are folded to N so alike reasons count together",
            _chart("dead-letters", dead_letters(data), "no dead letters in this run"),
        ),
    ]
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>edgesieve report: {_esc(data.data_dir)}</title>"
        f"<style>{_STYLE}</style>"
        f'<script type="text/javascript">{_plotly_js()}</script></head><body>'
        "<h1>edgesieve reduction report</h1>"
        f'<p class="meta">data directory {_esc(data.data_dir)}; {_esc(cloud)}; '
        f"generated {_esc(when)}</p>"
        f"{''.join(sections)}</body></html>"
    )
