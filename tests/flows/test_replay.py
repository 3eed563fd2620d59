"""Replay determinism: a run crashed at any point and resumed from its snapshot gives the same outputs.

``flows.edge`` reads recorded telemetry, vibration and logs (with late and malformed
messages among them) through the production ``Edge`` with recovery on and a
short snapshot interval. The reference run goes through uninterrupted; each
other run aborts at one point of the input (Bytewax's ``AbortExecution``,
which ends the execution without end of input) and is resumed from the last
snapshot in a second execution on the same data directory. Every output
table, in Parquet and in ``edge.duckdb``, must then hold exactly the rows of
the reference run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from bytewax.inputs import AbortExecution, FixedPartitionedSource, StatefulSourcePartition

from flows import edge
from flows.api import Edge
from flows.config import parse_config
from flows.machines import Machine, blocks
from operators.records import RawMessage
from tests.conftest import query_parquet

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
MS0 = int(T0.timestamp() * 1000)
BATCH = 10
PAUSE = timedelta(milliseconds=40)
STREAMS = (
    "telemetry_points",
    "telemetry_summary",
    "vibration_features",
    "alarms",
    "dead_letters",
    "device_attributes",
    "log_events",
    "log_summary",
)


def recorded() -> list[RawMessage]:
    """Telemetry, attributes and logs of three devices (late and malformed ones), two vibrating pumps."""
    out: list[RawMessage] = []
    for i in range(240):
        device = f"s-{i % 3}"
        ts = MS0 + i * 500
        if i == 150:
            ts -= 60_000  # a minute behind its own device: late
        received = T0 + timedelta(milliseconds=i * 500)
        body = json.dumps({"ts": ts, "values": {"t": float((i * 7) % 11), "seq": i}})
        out.append(RawMessage(device, "telemetry", "mqtt", received, body.encode()))
        if i % 60 == 0:
            out.append(RawMessage(device, "telemetry", "http", received, b"{not json"))
        if i % 20 == 0:
            attrs = json.dumps({"seq": i, "fw": f"1.{i}", "cfg": {"on": i % 40 == 0}})
            out.append(RawMessage(device, "attributes", "coap", received, attrs.encode()))
        if i % 4 == 0:
            at = ts - 60_000 if i == 160 else ts  # a minute behind its own device: late
            lines = [
                {"ts": at, "msg": f"step {i} done"},
                {"ts": ts, "msg": "tick", "level": "debug"},
            ]
            if i % 40 == 0:
                lines.append({"ts": ts, "level": "error", "msg": f"pump {i} hot"})
            text = "\n".join(json.dumps(line) for line in lines)
            if i % 80 == 0:
                text += "\n{not json"
            out.append(RawMessage(device, "logs", "http", received, text.encode()))
    for p, machine in enumerate((Machine("imbalance", seed=3), Machine("healthy", seed=4))):
        for block in blocks(machine, device=f"pump-{p}", count=24, start_ts=T0):
            out.append(RawMessage(f"pump-{p}", "vibration", "coap", T0, block))
    return out


class _Part(StatefulSourcePartition[RawMessage, int]):
    def __init__(self, source: Recorded, start: int) -> None:
        self._source, self._at, self._awake = source, start, None

    def next_batch(self) -> list[RawMessage]:
        src, at = self._source, self._at
        if at >= len(src.messages):
            raise StopIteration
        if at == src.abort_at and not src.aborted:
            src.aborted = True
            raise AbortExecution
        end = min(at + BATCH, len(src.messages))
        if src.abort_at is not None and at < src.abort_at < end:
            end = src.abort_at
        self._at = end
        self._awake = datetime.now(UTC) + PAUSE  # epochs (and snapshots) end between batches
        return src.messages[at:end]

    def next_awake(self) -> datetime | None:
        return self._awake

    def snapshot(self) -> int:
        return self._at


class Recorded(FixedPartitionedSource[RawMessage, int]):
    """The recorded messages in batches with pauses between them, ending once at ``abort_at``."""

    def __init__(self, messages: list[RawMessage], abort_at: int | None) -> None:
        self.messages, self.abort_at, self.aborted = messages, abort_at, False

    def list_parts(self) -> list[str]:
        return ["recorded"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Part:
        return _Part(self, resume_state or 0)


def run(data_dir: Path, source: Recorded) -> None:
    config = parse_config(
        {"data_dir": str(data_dir), "recovery": {"snapshot_interval": 0.1}, "parquet": {"max_file_age": 0.3}}
    )
    flow = Edge(config, name="edge", source=source)
    edge.build(flow)
    flow.run()


def outputs(data_dir: Path) -> dict[str, list[tuple]]:
    out = {}
    for stream in STREAMS:
        out[f"parquet:{stream}"] = query_parquet(data_dir, stream, "select * from {src} order by all")
    with duckdb.connect(str(data_dir / "edge.duckdb"), read_only=True) as con:
        for stream in STREAMS:
            out[f"duckdb:{stream}"] = con.sql(f"select * from {stream} order by all").fetchall()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[tuple]]:
    data = tmp_path_factory.mktemp("reference")
    run(data, Recorded(recorded(), None))
    got = outputs(data)
    for stream in STREAMS:
        assert got[f"parquet:{stream}"], f"the reference run wrote no {stream}"
    return got


@pytest.mark.parametrize("abort_at", [30, 95, 170, 250, 290])
def test_a_run_resumed_from_its_snapshot_writes_the_rows_of_an_uninterrupted_run(
    tmp_path, reference, abort_at
):
    source = Recorded(recorded(), abort_at)
    run(tmp_path, source)  # ends at the abort, without end of input
    run(tmp_path, source)  # resumes from the last snapshot
    got = outputs(tmp_path)
    for name, rows in reference.items():
        assert got[name] == rows, f"{name}: {len(got[name])} rows, the reference run {len(rows)}"
