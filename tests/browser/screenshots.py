"""Regenerate the README screenshots from a short real run: ``./dev.sh screenshots``.

``report.png``: ``edgesieve demo`` runs for a few seconds into a temporary
data directory and writes its HTML report (``edgesieve report`` makes it when
the demo did not); headless Chromium opens it and saves the top of the page.
``status.png``: an edge (``edgesieve run flows.edge``, as in the status page
test) receives telemetry and vibration blocks over HTTP and its status page
is saved once it shows them. Both go through the same headless Chromium as
the browser tests, so a page that logs a console error or fetches from the
network fails here too instead of being pictured.

Usage: ``python -m tests.browser.screenshots [OUT_DIR] [--seconds N]`` (from
the repository root; ``OUT_DIR`` defaults to ``docs/img``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.browser.conftest import ARTIFACTS, chromium
from tests.conftest import ROOT

DOCS_WINDOW = (1400, 1800)
"""Window of the README pictures (CSS pixels): the top of the page, as a reader first sees it."""
CHARTS_DRAWN = (
    "[...document.querySelectorAll('div.chart .js-plotly-plot')]"
    ".every(p => p.querySelector('.main-svg') !== null)"
)


def report_png(out: Path, seconds: float, tmp: Path) -> None:
    """Run the demo for ``seconds`` and picture its report as ``out``."""
    data = tmp / "demo"
    cli = [sys.executable, "-m", "flows.cli"]
    demo = [*cli, "demo", "--seconds", f"{seconds:g}", "--data-dir", str(data)]
    log = tmp / "demo.log"
    with log.open("wb") as out_log:
        done = subprocess.run(
            demo, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out_log, stderr=out_log
        )
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        pytest.fail(f"edgesieve demo exited {done.returncode}:\n{tail}")
    html = data / "report.html"
    if not html.exists():
        report = [*cli, "report", str(data), "--cloud", str(data / "cloud.duckdb")]
        subprocess.run([*report, "--out", str(html)], cwd=ROOT, check=True)
    with chromium(ARTIFACTS / "screenshots" / "report", window=DOCS_WINDOW) as page:
        page.open(html.as_uri(), label="report", ready=CHARTS_DRAWN)
        page.driver.save_screenshot(str(out))


def status_png(out: Path, tmp: Path) -> None:
    """Picture the status page of an edge that received telemetry and an alarm as ``out``."""
    from tests.browser import test_status_page as status

    edge = status.EdgeProcess(tmp)
    try:
        status.send_telemetry(edge, 0, 20)
        status.send_vibration(edge)
        status.settled(edge, lambda s: bool(s["recent_alarms"]), "the alarm on /status")
        with chromium(ARTIFACTS / "screenshots" / "status", window=(1400, 1000)) as page:
            page.open(edge.url, label="status")
            page.wait("document.querySelector('#recent-alarms tr.alarm')", "the alarm on the page")
            page.driver.save_screenshot(str(out))
    finally:
        edge.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the demo runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgesieve-screenshots-") as tmp:
        for name, make in (
            ("report.png", lambda path: report_png(path, args.seconds, Path(tmp))),
            ("status.png", lambda path: status_png(path, Path(tmp))),
        ):
            try:
                make(args.out / name)
            except pytest.skip.Exception as skipped:
                print(f"{name}: not made: {skipped.msg}", file=sys.stderr)
                return 1
            except pytest.fail.Exception as failed:
                print(f"{name}: not made: {failed.msg}", file=sys.stderr)
                return 1
            print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
