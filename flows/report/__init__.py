"""``edgesieve report``: one self-contained HTML page of what an edge reduced and saw.

:func:`build_report` reads an edge's data directory (the Parquet streams and
the run reports ``report-*.json``) and, optionally, the reference receiver's
DuckDB file, and writes one HTML file with plotly.js inlined: it opens
offline, from disk, in any browser. See :mod:`flows.report.data` for what
is read and :mod:`flows.report.html` for the page.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flows.report.data import ReportData, ReportError, load
from flows.report.html import CHARTS, render
from operators.spectral import SpectralConfig

__all__ = ["CHARTS", "ReportData", "ReportError", "build_report"]


def build_report(
    data_dir: str | Path,
    out: str | Path | None = None,
    *,
    cloud: str | Path | None = None,
    edge_id: str | None = None,
    series: Sequence[str] = (),
    top: int = 10,
    iso_thresholds_mm_s: tuple[float, float, float] = SpectralConfig.iso_thresholds_mm_s,
    bands_hz: tuple[tuple[float, float], ...] = SpectralConfig.bands_hz,
) -> Path:
    """Write the report of ``data_dir`` to ``out`` (default ``data_dir/report.html``); its path.

    ``cloud``: the receiver's DuckDB file (ratios from its ``uplink_batches``), whose
    batches of ``edge_id`` are this edge's (needed when it holds several edges);
    ``series``: telemetry series as ``device/key`` (default the three busiest);
    ``top``: devices in the per-device table. The ISO thresholds and bands
    label the vibration charts (the vibration flow's settings).
    """
    data_dir = Path(data_dir)
    data = load(
        data_dir,
        cloud=Path(cloud) if cloud is not None else None,
        edge_id=edge_id,
        series=series,
        top=top,
        iso_thresholds_mm_s=iso_thresholds_mm_s,
        bands_hz=bands_hz,
    )
    path = Path(out) if out is not None else data_dir / "report.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(render(data), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        msg = (
            f"report: cannot write {path} ({exc.strerror or exc}); hint: give --out a path "
            "in a writable directory"
        )
        raise ReportError(msg) from None
    return path
