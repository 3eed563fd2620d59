"""A flow's output streams: what its steps declared, and the sinks that write them.

:meth:`flows.api.Edge.output` records each output in an :class:`Output`;
when the flow is finished, :func:`attach_outputs` merges the outputs of each
stream, counts the rows in the flow's report and adds its sinks: Parquet and
DuckDB on the edge, the cloud sink per ``cloud`` (:func:`cloud_default`).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Stream

from connectors.sinks.cloud import CloudSink, CloudSinkSettings
from connectors.sinks.duckdb import DuckDBSink
from connectors.sinks.parquet import ParquetSettings, ParquetSink
from connectors.streams import STREAMS, StreamSpec
from flows.accounting import Meter
from flows.cloud import CloudLink
from flows.config import EdgeConfig
from flows.status import RECENT_ALARMS

__all__ = ["Output", "attach_outputs", "by_device", "cloud_default"]

CLOUD_BY_DEFAULT = frozenset(
    {
        "telemetry_summary",
        "vibration_features",
        "alarms",
        "device_attributes",
        "log_events",
        "log_summary",
    }
)
"""Streams sent to the cloud when ``cloud`` is configured (points with ``cloud.send_points``)."""

LOCAL_ONLY = frozenset({"telemetry_text", "dead_letters"})
"""Streams that stay on the edge unless an output asks for ``cloud=True``."""


@dataclass
class Output:
    """One output stream of a flow part, and every step's output into it."""

    spec: StreamSpec
    model: str
    """The standard stream whose defaults it takes (``alarms`` for alarm rows)."""
    priority: int
    max_file_age: timedelta | None
    streams: list[tuple[Stream[Any], bool, bool]] = field(default_factory=list)
    """Each output of the stream: ``(items, local, cloud)``."""


def cloud_default(config: EdgeConfig, model: str) -> bool:
    """Whether a stream like ``model`` goes to the cloud when its output does not say."""
    cloud = config.cloud
    if cloud is None:
        return False
    if model == "telemetry_points":
        return cloud.send_points
    if model in LOCAL_ONLY:
        return False
    return model in CLOUD_BY_DEFAULT or model not in STREAMS


def attach_outputs(
    outputs: dict[str, Output],
    config: EdgeConfig,
    meter: Meter,
    step_id: Callable[[str], str],
    *,
    link: CloudLink | None,
    alarms: deque[Any],
    recovery_dir: Path | None,
) -> None:
    """Add the sinks of every stream in ``outputs``; ``step_id`` makes a part's step ids.

    Rows written on the edge are counted in ``meter``; alarm rows are also
    kept in ``alarms`` (the status's recent alarms).
    """
    partitions = config.recovery.partitions
    for name, out in outputs.items():
        here = [s for s, local, _ in out.streams if local]
        there = [s for s, _, cloud in out.streams if cloud]
        recent = alarms if out.model == "alarms" else None
        rows = _merged(step_id, name, here or there, meter=meter, recent=recent)
        if there and there != (here or there):
            rows_for_cloud = _merged(step_id, f"{name}_cloud", there)
        else:
            rows_for_cloud = rows
        if config.sinks.parquet and here:
            age = out.max_file_age if out.max_file_age is not None else config.parquet.max_file_age
            parquet = ParquetSink(
                config.data_dir / "parquet",
                out.spec,
                partitions=partitions,
                settings=ParquetSettings(
                    max_file_bytes=config.parquet.max_file_bytes, max_file_age=age
                ),
                on_write=meter.on_file,
                recovery_dir=recovery_dir,
            )
            op.output(step_id(f"out_{name}"), rows, parquet)
        if config.sinks.duckdb and here:
            local = DuckDBSink(
                config.data_dir / "edge.duckdb",
                out.spec,
                partitions=partitions,
                recovery_dir=recovery_dir,
            )
            op.output(step_id(f"duckdb_{name}"), rows, local)
        if there and link is not None and config.cloud is not None:
            sink = CloudSink(
                link.open,
                config.edge_id,
                out.spec,
                settings=CloudSinkSettings(
                    max_rows=config.cloud.batch_rows,
                    max_age=(
                        config.cloud.alarm_batch_age
                        if out.priority == 0
                        else config.cloud.batch_age
                    ),
                ),
                priority=out.priority,
                raw_bytes=lambda _rows, m=meter: m.claim_raw_bytes(),
                on_seal=lambda s, m=meter: m.on_wire(s.stream, s.rows, len(s.payload)),
                partitions=config.cloud.partitions,
            )
            op.output(step_id(f"cloud_{name}"), rows_for_cloud, sink)


def _merged(
    step_id: Callable[[str], str],
    name: str,
    streams: list[Stream[Any]],
    *,
    meter: Meter | None = None,
    recent: deque[Any] | None = None,
) -> Any:
    """``streams`` as one, keyed by device for the sinks (and counted in ``meter`` when given).

    Counted rows are also appended to ``recent`` when given.
    """
    up = streams[0] if len(streams) == 1 else op.merge(step_id(f"merge_{name}"), *streams)
    if meter is not None:
        return op.flat_map_batch(step_id(f"count_{name}"), up, _counter(meter, name, recent))
    return op.map(step_id(f"key_{name}"), up, by_device)


def by_device(item: Any) -> tuple[str, Any]:
    """``(device, record)`` of a record, keyed or not: what the partitioned sinks route on."""
    record = item[1] if type(item) is tuple else item
    return str(getattr(record, "device", "") or ""), record


def _counter(
    meter: Meter, stream: str, recent: deque[Any] | None = None
) -> Callable[[list[Any]], list[Any]]:
    """A batch mapper that keys items by device (see :func:`by_device`) and counts them.

    With ``recent`` (a bounded deque) the last rows are kept there too.
    """

    def count(batch: list[Any]) -> list[Any]:
        items = [by_device(x) for x in batch]
        devices: Tally[str] = Tally(device for device, _ in items)
        meter.add(stream, devices)
        if recent is not None:
            recent.extend(record for _, record in items[-RECENT_ALARMS:])
        return items

    return count
