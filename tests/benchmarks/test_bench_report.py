"""The report benchmark runs end to end on a small data directory and prints its figures."""

from __future__ import annotations

import re

from benchmarks import bench_report as bench


def test_bench_report_prints_time_and_size(capsys):
    assert bench.main(["--minutes", "1", "--sensors", "2", "--machines", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("data: 1 min, 2 sensors at 1 Hz, 1 machines")
    assert re.fullmatch(r"report: [\d.]+ s, [\d.]+ MB HTML \(reading .*\)", out[1])
    assert re.fullmatch(r"report --cloud: [\d.]+ s, [\d.]+ MB HTML \(reading .*\)", out[2])
