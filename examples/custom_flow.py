"""A flow of your own: keep pressure readings that move more than 0.2, and 10 s pressure summaries.

Run it with either runner::

    edgesieve run examples/custom_flow.py --config edge.yaml
    EDGESIEVE_CONFIG=edge.yaml python -m bytewax.run examples/custom_flow.py

Devices publish ``{"pressure": 3.1, "temperature": 20.5}`` on
``v1/devices/{device_id}/telemetry``; the flow writes the streams
``pressure_points`` and ``pressure_summary`` under ``data_dir/parquet`` (and to
the cloud when ``cloud`` is configured). Temperature readings are dropped by
the filter; undecodable messages land in ``dead_letters`` by themselves.
"""

from datetime import timedelta

import bytewax.operators as op

from flows.api import Edge
from flows.runtime import lazy_flow
from operators.deadband import deadband
from operators.windows import window_aggregate


def build(edge: Edge) -> None:
    """Pressure points through a deadband, and pressure summaries per 10 s window."""
    dev = edge.devices("in", channels=["telemetry"])
    pressure = op.filter("pressure", dev.readings, lambda kv: kv[1].key == "pressure")
    kept = deadband("deadband", pressure, absolute=0.2)
    edge.output("pressure_points", kept, like="telemetry_points")
    windows = window_aggregate("window", pressure, length=timedelta(seconds=10))
    edge.output("pressure_summary", windows.down, like="telemetry_summary")
    edge.dead_letters(windows.late, reason="late: pressure reading after its window closed")


__getattr__ = lazy_flow(__name__, build)  # the `flow` Bytewax's runner looks for
