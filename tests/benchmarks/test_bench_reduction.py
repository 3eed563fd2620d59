"""Smoke run of benchmarks/bench_reduction.py: every workload at --quick scale, real receiver."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_reduction as bench

NAMES = [w.name for w in bench.WORKLOADS]
LINE = re.compile(
    r"^(?P<name>[a-z-]+): raw/wire = (?P<ratio>[\d,.]+):1 \(published (?P<published>[\d,]+:1)"
    r"[^)]*\)?; target >= [\d,.]+:1 [^;]*; at live pace (?P<live>[\d,.]+):1 with batch_age 60 s\); "
    r"(?P<fidelity>.+); fidelity OK \| .+$"
)


def test_every_workload_is_listed_with_its_published_ratio():
    assert NAMES == ["sensor", "vibration", "vibration-steady", "logs", "metrics"]
    published = {w.name: w.published.split()[0] for w in bench.WORKLOADS}
    assert published == {
        "sensor": "20:1",
        "vibration": "10:1",
        "vibration-steady": "10,000:1",
        "logs": "50:1",
        "metrics": "5:1",
    }


@pytest.mark.parametrize("workload", bench.WORKLOADS, ids=NAMES)
def test_quick_run_prints_its_line_and_keeps_fidelity(workload: bench.Workload, tmp_path: Path):
    line, ok = bench.measure(workload, seed=5, quick=True, tmp=tmp_path)
    if line == f"{workload.name}: skipped ({bench.FLOWS[workload.name]} not available)":
        pytest.skip(line)
    match = LINE.match(line)
    assert match, line
    assert match["name"] == workload.name and ok, line
    assert float(match["ratio"].replace(",", "")) > 1 and float(match["live"].replace(",", "")) > 1
    fidelity = match["fidelity"]
    if workload.name == "sensor":
        assert re.search(r", 0 of \d+ readings beyond it$", fidelity), line
    elif workload.name == "vibration":
        assert re.match(
            r"(\d+) of \1 alarms delivered, faults alarmed 3/3, false alarms 0, ", fidelity
        )
    elif workload.name == "vibration-steady":
        assert fidelity.endswith(", 0 skipped rows beyond tolerance"), line
    elif workload.name == "logs":
        assert re.match(r"(\d+) of \1 ERROR lines delivered$", fidelity), line
    else:
        assert "count/min/max wrong in 0/0/0" in fidelity, line


def test_the_same_seed_gives_the_same_payloads():
    first = [m.payload for m in bench.sensor_messages(3, True).messages[:50]]
    again = [m.payload for m in bench.sensor_messages(3, True).messages[:50]]
    other = [m.payload for m in bench.sensor_messages(4, True).messages[:50]]
    assert first == again != other
    blocks = bench.vibration_messages(3, True).messages
    assert [m.payload for m in list(blocks)[:8]] == [m.payload for m in list(blocks)[:8]]


def test_missing_logs_flow_is_reported_as_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setitem(bench.FLOWS, "logs", "flows.no_such_logs_flow")
    logs = next(w for w in bench.WORKLOADS if w.name == "logs")
    line, ok = bench.measure(logs, seed=1, quick=True, tmp=tmp_path)
    assert (line, ok) == ("logs: skipped (flows.no_such_logs_flow not available)", True)


def test_script_runs_with_seed_and_only(tmp_path: Path):
    script = Path(bench.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--seed", "2", "--only", "metrics"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent.parent,
        env={"PYTHONPATH": str(script.parent.parent), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("metrics: raw/wire = "), done.stdout
