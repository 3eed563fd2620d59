"""The report's figures: one plotly figure (or None: no data) per chart, built from columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from flows.accounting import ratio_text
from flows.report.data import Columns, ReportData

__all__ = [
    "ZONES",
    "alarms",
    "band_energy",
    "dead_letters",
    "ratio_devices",
    "ratio_streams",
    "raw_wire",
    "rms",
    "spectrum",
    "telemetry",
]

ZONES = (("A", "#2ca02c"), ("B", "#bcbd22"), ("C", "#ff7f0e"), ("D", "#d62728"))
"""The ISO 10816 zones and their colours, lowest first."""


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


def raw_wire(data: ReportData) -> go.Figure | None:
    """Raw and wire bytes over time per flow, cumulative."""
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


def ratio_streams(data: ReportData) -> go.Figure | None:
    """Raw and wire bytes per stream, with the ratio."""
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


def ratio_devices(data: ReportData) -> go.Figure | None:
    """Raw and wire bytes of the top devices, with the ratio."""
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


def telemetry(data: ReportData) -> go.Figure | None:
    """Chosen series: raw readings, kept deadband points and the window band."""
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


def rms(data: ReportData) -> go.Figure | None:
    """Velocity RMS per machine and axis on the ISO zones, alarms as marks."""
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


def band_energy(data: ReportData) -> go.Figure | None:
    """Band energies per machine over time."""
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


def spectrum(data: ReportData) -> go.Figure | None:
    """The band energies of each machine's latest feature row."""
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


def alarms(data: ReportData) -> go.Figure | None:
    """The alarms timeline."""
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


def dead_letters(data: ReportData) -> go.Figure | None:
    """Dead letters by reason."""
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
