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
from plotly.subplots import make_subplots

from flows.accounting import ratio_text
from flows.report.data import MAX_KEPT_POINTS, Columns, ReportData, flow_totals

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

ZONES = (("A", "#2ca02c"), ("B", "#bcbd22"), ("C", "#ff7f0e"), ("D", "#d62728"))

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


def _groups(cols: Columns, *keys: str) -> list[tuple[tuple[Any, ...], np.ndarray]]:
    """Row indices of each distinct combination of ``keys`` (rows are sorted by them)."""
    if not cols or len(cols[keys[0]]) == 0:
        return []
    n = len(cols[keys[0]])
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        col = cols[k]
        change[1:] |= col[1:] != col[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)
    return [
        (tuple(cols[k][s] for k in keys), np.arange(s, e))
        for s, e in zip(starts, ends, strict=True)
    ]


# -- charts --------------------------------------------------------------------------------


def _raw_wire(data: ReportData) -> go.Figure | None:
    cols = data.bytes_over_time
    fig = go.Figure()
    if data.cloud is not None:
        for (flow,), idx in _groups(cols, "flow"):
            t = cols["t"][idx]
            fig.add_scatter(x=t, y=cols["raw_bytes"][idx], name=f"{flow} raw", mode="lines")
            fig.add_scatter(
                x=t,
                y=cols["wire_bytes"][idx],
                name=f"{flow} wire",
                mode="lines",
                line={"dash": "dash"},
            )
    else:
        for (flow,), idx in _groups(cols, "flow"):
            t = cols["t"][idx]
            fig.add_scatter(
                x=t, y=cols["local_bytes"][idx], name=f"{flow} local output", mode="lines"
            )
            rep = data.reports.get(str(flow))
            if rep is not None and len(t):
                wire = sum(rep.wire_bytes.values())
                marks = [(f"{flow} raw (run total)", rep.raw_bytes, "diamond")]
                if wire:
                    marks.append((f"{flow} wire (run total)", wire, "square"))
                for label, value, symbol in marks:
                    fig.add_scatter(
                        x=[t[-1]],
                        y=[value],
                        name=label,
                        mode="markers",
                        marker={"symbol": symbol, "size": 11},
                    )
    if not fig.data:
        return None
    fig.update_layout(
        yaxis={"type": "log", "title": "bytes (cumulative, log scale)"},
        xaxis={"title": "time (UTC)"},
        height=420,
    )
    return fig


def _ratio_streams(data: ReportData) -> go.Figure | None:
    cols = data.ratio_streams
    if not cols or len(cols["stream"]) == 0:
        return None
    fig = go.Figure()
    if data.cloud is not None:
        ratio = cols["ratio"].astype(float)
        fig.add_bar(x=cols["stream"], y=cols["raw_bytes"], name="raw bytes")
        fig.add_bar(
            x=cols["stream"],
            y=cols["wire_bytes"],
            name="wire bytes",
            text=[ratio_text(r) if np.isfinite(r) else "n/a" for r in ratio],
            textposition="outside",
        )
    else:
        fig.add_bar(x=cols["stream"], y=cols["local_bytes"], name="local output bytes")
        fig.add_bar(x=cols["stream"], y=cols["wire_bytes"], name="wire bytes")
    fig.update_layout(barmode="group", yaxis={"type": "log", "title": "bytes (log)"}, height=380)
    return fig


def _ratio_devices(data: ReportData) -> go.Figure | None:
    cols = data.ratio_devices
    if not cols or len(cols["device"]) == 0:
        return None
    out = "wire_bytes" if "wire_bytes" in cols else "local_bytes"
    ratio = cols["ratio"].astype(float)
    fig = go.Figure()
    fig.add_bar(x=cols["device"], y=cols["raw_bytes"], name="raw bytes")
    fig.add_bar(
        x=cols["device"],
        y=cols[out],
        name=out.replace("_", " "),
        text=[ratio_text(r) if np.isfinite(r) else "n/a" for r in ratio],
        textposition="outside",
    )
    fig.update_layout(barmode="group", yaxis={"type": "log", "title": "bytes (log)"}, height=380)
    return fig


def _telemetry(data: ReportData) -> go.Figure | None:
    if not data.series:
        return None
    fig = make_subplots(
        rows=len(data.series),
        cols=1,
        subplot_titles=[f"{d}/{k}" for d, k in data.series],
        vertical_spacing=0.08,
    )
    band = dict(_groups(data.summary_band, "device", "key"))
    points = dict(_groups(data.points, "device", "key"))
    raw = dict(_groups(data.raw_readings, "device", "key"))
    for row, (device, key) in enumerate(data.series, start=1):
        first = row == 1
        if (device, key) in raw:
            idx = raw[device, key]
            fig.add_scatter(
                x=data.raw_readings["ts"][idx],
                y=data.raw_readings["value"][idx],
                name="raw readings",
                legendgroup="raw",
                showlegend=first,
                mode="lines",
                line={"color": "#999", "width": 1},
                row=row,
                col=1,
            )
        if (device, key) in band:
            b, idx = data.summary_band, band[device, key]
            # steps from each window's start; the last one held to its window's end
            steps = np.append(b["window_start"][idx], b["window_end"][idx][-1:])

            def held(field: str, idx: np.ndarray = idx, b: Columns = b) -> np.ndarray:
                return np.append(b[field][idx], b[field][idx][-1:])

            for field, name, fill in (
                ("max", "window max", None),
                ("min", "window min", "tonexty"),
            ):
                fig.add_scatter(
                    x=steps,
                    y=held(field),
                    name="window min/max band" if fill else name,
                    legendgroup="band",
                    showlegend=first and fill is not None,
                    mode="lines",
                    line={"width": 0, "shape": "hv", "color": "#9ecae1"},
                    fill=fill,
                    fillcolor="rgba(158,202,225,0.45)",
                    row=row,
                    col=1,
                )
            fig.add_scatter(
                x=steps,
                y=held("mean"),
                name="window mean",
                legendgroup="mean",
                showlegend=first,
                mode="lines",
                line={"shape": "hv", "color": "#3182bd", "dash": "dot"},
                row=row,
                col=1,
            )
        if (device, key) in points:
            idx = points[device, key]
            fig.add_scatter(
                x=data.points["ts"][idx],
                y=data.points["value"][idx],
                name="kept deadband points (held until the next)",
                legendgroup="points",
                showlegend=first,
                mode="lines+markers",
                marker={"size": 5, "color": "#e6550d"},
                line={"shape": "hv", "color": "#e6550d", "width": 1},
                row=row,
                col=1,
            )
    fig.update_layout(height=280 * len(data.series) + 80)
    fig.update_xaxes(title_text="time (UTC)", row=len(data.series), col=1)
    return fig


def _zones(fig: go.Figure, thresholds: tuple[float, float, float], top: float) -> None:
    edges = (0.0, *thresholds, max(top, thresholds[-1] * 1.2))
    for (zone, color), lo, hi in zip(ZONES, edges, edges[1:], strict=False):
        fig.add_hrect(
            y0=lo,
            y1=hi,
            fillcolor=color,
            opacity=0.12,
            line_width=0,
            annotation_text=f"zone {zone}",
            annotation_position="top left",
        )


def _rms(data: ReportData) -> go.Figure | None:
    cols = data.rms
    if not cols or len(cols["ts"]) == 0:
        return None
    fig = go.Figure()
    for (device, axis), idx in _groups(cols, "device", "axis"):
        fig.add_scatter(
            x=cols["ts"][idx],
            y=cols["velocity_rms_mm_s"][idx],
            name=f"{device} {axis}",
            mode="lines",
        )
    top = float(np.nanmax(cols["velocity_rms_mm_s"])) * 1.1
    alarms = data.alarms
    if alarms and len(alarms["ts"]):
        iso = np.char.startswith(alarms["rule"].astype(str), "iso_zone")
        text = [
            f"{d} {k} {r} {s} ({v:.3g})"
            for d, k, r, s, v in zip(
                alarms["device"],
                alarms["key"],
                alarms["rule"],
                alarms["state"],
                alarms["value"],
                strict=True,
            )
        ]
        raised = alarms["state"] == "raised"
        for mask, name, y, symbol in (
            (iso & raised, "ISO zone alarm raised", alarms["value"], "triangle-up"),
            (iso & ~raised, "ISO zone alarm cleared", alarms["value"], "triangle-down"),
            (~iso, "other alarm (value in hover)", np.full(len(iso), top), "x"),
        ):
            if mask.any():
                fig.add_scatter(
                    x=alarms["ts"][mask],
                    y=y[mask],
                    name=name,
                    mode="markers",
                    marker={"symbol": symbol, "size": 10, "color": "#000"},
                    text=np.array(text, dtype=object)[mask],
                    hoverinfo="x+text",
                )
    _zones(fig, data.iso_thresholds_mm_s, top)
    fig.update_layout(
        yaxis={"title": "velocity RMS (mm/s)"}, xaxis={"title": "time (UTC)"}, height=460
    )
    return fig


def _band_label(bands: Sequence[tuple[float, float]], i: int) -> str:
    if 0 <= i < len(bands):
        lo, hi = bands[i]
        return f"{lo:g}-{hi:g} Hz"
    return f"band {i + 1}"


def _band_energy(data: ReportData) -> go.Figure | None:
    cols = data.band_energy
    if not cols or len(cols["ts"]) == 0:
        return None
    fig = go.Figure()
    for (device, band), idx in _groups(cols, "device", "band"):
        fig.add_scatter(
            x=cols["ts"][idx],
            y=cols["energy"][idx],
            name=f"{device} {_band_label(data.bands_hz, int(band) - 1)}",
            mode="lines",
        )
    fig.update_layout(
        yaxis={"type": "log", "title": "band energy (mean of axes, log)"},
        xaxis={"title": "time (UTC)"},
        height=420,
    )
    return fig


def _spectrum(data: ReportData) -> go.Figure | None:
    cols = data.spectrum
    if not cols or len(cols["ts"]) == 0:
        return None
    fig = go.Figure()
    for i in range(len(cols["ts"])):
        energy = np.asarray(cols["band_energy"][i], dtype=float)
        labels = [_band_label(data.bands_hz, j) for j in range(len(energy))]
        fig.add_bar(
            x=labels,
            y=energy,
            name=(
                f"{cols['device'][i]} {cols['axis'][i]} (dominant "
                f"{float(cols['dominant_hz'][i]):.1f} Hz, zone {cols['iso_zone'][i]})"
            ),
        )
    fig.update_layout(
        barmode="group",
        yaxis={"type": "log", "title": "band energy (log)"},
        xaxis={"title": "frequency band"},
        height=400,
    )
    return fig


def _alarms(data: ReportData) -> go.Figure | None:
    cols = data.alarms
    if not cols or len(cols["ts"]) == 0:
        return None
    fig = go.Figure()
    rules = sorted(set(cols["rule"].tolist()))
    for rule in rules:
        for state, symbol in (("raised", "triangle-up"), ("cleared", "circle-open")):
            mask = (cols["rule"] == rule) & (cols["state"] == state)
            if not mask.any():
                continue
            fig.add_scatter(
                x=cols["ts"][mask],
                y=cols["device"][mask],
                name=f"{rule} {state}",
                mode="markers",
                marker={"symbol": symbol, "size": 10},
                text=[
                    f"{k} {s} value {v:.3g}"
                    for k, s, v in zip(
                        cols["key"][mask], cols["severity"][mask], cols["value"][mask], strict=True
                    )
                ],
            )
    devices = len(set(cols["device"].tolist()))
    fig.update_layout(xaxis={"title": "time (UTC)"}, height=160 + 40 * devices)
    return fig


def _dead_letters(data: ReportData) -> go.Figure | None:
    cols = data.dead_letters
    if not cols or len(cols["n"]) == 0:
        return None
    reasons = [r if len(r) <= 90 else r[:87] + "..." for r in cols["reason"].tolist()]
    fig = go.Figure(
        go.Bar(
            x=cols["n"][::-1],
            y=reasons[::-1],
            orientation="h",
            hovertext=cols["reason"][::-1],
            name="dead letters",
        )
    )
    fig.update_layout(
        xaxis={"title": "dead letters"},
        yaxis={"automargin": True},
        height=120 + 30 * len(reasons),
    )
    return fig


# -- tables --------------------------------------------------------------------------------


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
            _chart("raw-wire-over-time", _raw_wire(data), "no run report or output over time"),
        ),
        _section(
            "Ratio per stream",
            "from the receiver's uplink_batches"
            if data.cloud is not None
            else "from the edge's run reports (raw bytes are counted per flow: see the summary)",
            _chart("ratio-by-stream", _ratio_streams(data), "no stream was written"),
            _ratio_stream_table(data),
        ),
        _section(
            "Ratio per device (top by raw bytes)",
            data.device_source,
            _chart("ratio-by-device", _ratio_devices(data), "no device bytes in the run reports"),
            _ratio_device_table(data),
        ),
        _section(
            "Telemetry: kept points against the window band",
            f"kept deadband points (telemetry_points, held until the next one) over the window "
            f"mean and min/max (telemetry_summary); {raw_note}; at most the newest "
            f"{MAX_KEPT_POINTS:,} points and raw readings per series",
            _chart("telemetry-series", _telemetry(data), "no telemetry output"),
        ),
        _section(
            "Vibration: velocity RMS per machine and axis",
            f"ISO 10816 zones A/B/C/D at {iso} mm/s; alarms as black marks{bucket}",
            _chart("vibration-rms", _rms(data), "no vibration_features output"),
        ),
        _section(
            "Vibration: band energies",
            "energy per configured band, mean of the axes",
            _chart("band-energy", _band_energy(data), "no vibration_features output"),
        ),
        _section(
            "Vibration: spectrum of the latest frame per machine",
            "the edge stores no full spectrum: bars are the band energies of each machine's "
            "latest feature row, per axis, with its dominant frequency",
            _chart("spectrum", _spectrum(data), "no vibration_features output"),
        ),
        _section(
            "Alarms",
            "raised (triangle) and cleared (circle) per device and rule",
            _chart("alarms-timeline", _alarms(data), "no alarms in this run"),
        ),
        _section(
            "Dead letters by reason",
            "numbers in reasons are folded to N so alike reasons count together",
            _chart("dead-letters", _dead_letters(data), "no dead letters in this run"),
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
