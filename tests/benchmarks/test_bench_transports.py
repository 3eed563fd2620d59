"""Smoke run of benchmarks/bench_transports.py: HTTP, one round of all three sides, real servers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIDES = {
    "a": "server + bare drain",
    "b": "server + telemetry flow",
    "c": "ingest process, no flow",
}


def test_http_round_runs_every_side_and_every_answer_arrives():
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_transports.py", "--transports", "http"]
        + ["--rounds", "1", "--http-requests", "300", "--warmup", "20", "--devices", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for side, label in SIDES.items():
        line = re.search(rf"round 1 \({side}\) {re.escape(label)}: +([\d,]+) accepted/s", out)
        assert line and int(line.group(1).replace(",", "")) > 0, out
    # (b) and (c) answer after the journal commit: their journal figures are printed
    assert len(re.findall(r"journal: [\d,]+ group commits", out)) == 2, out
    for ratio in ("(b)/(a)", "(c)/(a)", "(b)/(c)"):
        assert re.search(rf"ratio {re.escape(ratio)} throughput: +[\d.]+ -> median", out), out
    for side in ("(a) bare drain", "(b) flow", "(c) journal"):
        assert f"{side} received / 200 answers per round (warm-up included): 320/320: ok" in out
