"""The filter operator's expression: vectorised NumPy versus per-item Python and DuckDB SQL.

The same seeded telemetry readings (50 devices x 4 keys, a random walk per
series), keyed by series, go through three Bytewax dataflows for each
expression and source batch size:

(a) ``op.filter`` with a hand-written per-item Python predicate (the bare
    baseline: what a flow writes without the operator), and the same
    predicate in ``op.branch`` with the dropped items sent to a counting
    sink (the same outputs as (b));
(b) ``filter_items(where=...)``: the expression compiled once, evaluated a
    micro-batch at a time over NumPy column arrays, kept and dropped items
    both emitted (dropped counted by a sink, as ``Edge.count_dropped`` does);
(c) DuckDB: each micro-batch as an Arrow table (device, key, value), the
    expression as SQL (``SELECT expr FROM batch``), the mask selecting the
    kept items.

It checks that every way keeps the same items, then prints readings per
CPU-second (the machine may be shared; best of ``--repeat`` interleaved runs)
and the ratios of (b) to the others. Run: ``python benchmarks/bench_filter.py``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import bytewax.operators as op
import duckdb
import numpy as np
import pyarrow as pa
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import TestingSource, run_main

from operators.filter import filter_items
from operators.records import Reading, series_key

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEYS = ("temp", "hum", "rpm", "pressure")
WAYS = ("python", "branch", "numpy", "duckdb")

CASES: list[tuple[str, Callable[[Reading], bool], str]] = [
    ("value > -1000", lambda r: r.value > -1000, "value > -1000"),  # nothing dropped
    (
        'value > 3 and key in ("temp", "hum")',
        lambda r: r.value > 3 and r.key in ("temp", "hum"),
        "value > 3 AND key IN ('temp', 'hum')",
    ),
    (
        'abs(value - 20) >= 2.5 or device == "pump-7"',
        lambda r: abs(r.value - 20) >= 2.5 or r.device == "pump-7",
        "abs(value - 20) >= 2.5 OR device = 'pump-7'",
    ),
    (
        "(value * 1.8 + 32 > 70 and value % 2 < 1) or abs(value - 18) < 0.5",
        lambda r: (r.value * 1.8 + 32 > 70 and r.value % 2 < 1) or abs(r.value - 18) < 0.5,
        "(value * 1.8 + 32 > 70 AND fmod(value, 2) + (CASE WHEN value < 0 THEN 2 ELSE 0 END) < 1) "
        "OR abs(value - 18) < 0.5",
    ),
]


def make_readings(count: int, seed: int) -> list[tuple[str, Reading]]:
    """``count`` readings round-robin over 50 devices x 4 keys, a random walk around 20."""
    rng = np.random.default_rng(seed)
    series = [(f"pump-{d}", k) for d in range(50) for k in KEYS]
    steps = rng.normal(0.0, 0.5, count)
    level = np.full(len(series), 20.0)
    out = []
    for i in range(count):
        j = i % len(series)
        level[j] += steps[i]
        device, key = series[j]
        r = Reading(device, key, T0 + timedelta(milliseconds=i), float(level[j]))
        out.append((series_key(device, key), r))
    return out


class _Partition(StatelessSinkPartition[Any]):
    def __init__(self, sink: Counter) -> None:
        self.sink = sink

    def write_batch(self, items: list[Any]) -> None:
        self.sink.count += len(items)
        if self.sink.keep:
            self.sink.items.extend(items)


class Counter(DynamicSink[Any]):
    """Counts what reaches it (and keeps it, to compare the ways)."""

    def __init__(self, *, keep: bool = False) -> None:
        self.count = 0
        self.keep = keep
        self.items: list[Any] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Partition:
        return _Partition(self)


def duckdb_mapper(sql: str) -> Callable[[list[Any]], list[Any]]:
    """A batch mapper keeping the items for which the SQL expression is true."""
    con = duckdb.connect()
    query = f"SELECT ({sql}) AS keep FROM batch"

    def keep(batch: list[Any]) -> list[Any]:
        values = [kv[1] for kv in batch]
        table = pa.table(
            {
                "device": pa.array([r.device for r in values], pa.string()),
                "key": pa.array([r.key for r in values], pa.string()),
                "value": pa.array([r.value for r in values], pa.float64()),
            }
        )
        con.register("batch", table)
        mask = con.execute(query).fetchnumpy()["keep"]
        con.unregister("batch")
        return [batch[i] for i in np.flatnonzero(mask)]

    return keep


def run(way: str, items: list[Any], batch: int, case: tuple) -> tuple[float, list[Any]]:
    where, predicate, sql = case
    flow = Dataflow(f"bench_filter_{way}")
    s = op.input("in", flow, TestingSource(items, batch_size=batch))
    kept = Counter(keep=True)
    if way == "python":
        op.output("out", op.filter("filter", s, lambda kv: predicate(kv[1])), kept)
    elif way == "branch":
        split = op.branch("filter", s, lambda kv: predicate(kv[1]))
        op.output("out", split.trues, kept)
        op.output("dropped", split.falses, Counter())
    elif way == "numpy":
        out = filter_items("filter", s, where=where)
        op.output("out", out.kept, kept)
        op.output("dropped", out.dropped, Counter())
    else:
        op.output("out", op.flat_map_batch("filter", s, duckdb_mapper(sql)), kept)
    start = time.process_time()  # CPU time: the machine may be shared
    run_main(flow)
    return time.process_time() - start, kept.items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per way")
    args = parser.parse_args()
    items = make_readings(args.readings, args.seed)
    for batch in args.batch:
        for case in CASES:
            best: dict[str, float] = {}
            kept: dict[str, list[Any]] = {}
            for _ in range(args.repeat):  # interleaved, best of N
                for way in WAYS:
                    seconds, got = run(way, items, batch, case)
                    best[way] = min(best.get(way, seconds), seconds)
                    kept[way] = got
            first = kept[WAYS[0]]
            assert all(kept[w] == first for w in WAYS), "the ways disagree"
            rate = {w: args.readings / s for w, s in best.items()}
            print(
                f"batch {batch:>5}  {case[0]:<46.46} kept {len(first):>6}/{args.readings}  "
                "readings/CPU-s: "
                + "  ".join(f"{w} {rate[w]:>9,.0f}" for w in WAYS)
                + f"  numpy/python {rate['numpy'] / rate['python']:.2f}x"
                f"  numpy/branch {rate['numpy'] / rate['branch']:.2f}x"
                f"  numpy/duckdb {rate['numpy'] / rate['duckdb']:.2f}x"
            )


if __name__ == "__main__":
    main()
