"""Which streams go to the cloud by default, and how output rows are keyed for the sinks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flows.config import parse_config
from flows.outputs import by_device, cloud_default

CLOUD = {"target": "127.0.0.1:9", "key": "edge-01", "secret": "s"}


@pytest.mark.parametrize(
    ("model", "send_points", "sent"),
    [
        ("telemetry_summary", False, True),
        ("alarms", False, True),
        ("vibration_features", False, True),
        ("telemetry_points", False, False),
        ("telemetry_points", True, True),
        ("telemetry_text", True, False),
        ("dead_letters", True, False),
        ("my_own_stream", False, True),  # a new stream without a standard model
    ],
)
def test_cloud_default_follows_the_stream_model_and_send_points(tmp_path, model, send_points, sent):
    config = parse_config(
        {"data_dir": str(tmp_path), "cloud": {**CLOUD, "send_points": send_points}}
    )
    assert cloud_default(config, model) is sent


def test_without_a_cloud_nothing_goes_there(tmp_path):
    config = parse_config({"data_dir": str(tmp_path)})
    assert not cloud_default(config, "alarms")


@dataclass(frozen=True)
class Row:
    device: str | None
    value: float


def test_rows_are_keyed_by_their_device_keyed_or_not():
    row = Row("pump-1", 1.0)
    assert by_device(row) == ("pump-1", row)
    assert by_device(("other-key", row)) == ("pump-1", row)  # the record's device wins
    assert by_device(Row(None, 2.0)) == ("", Row(None, 2.0))
    assert by_device({"value": 3.0}) == ("", {"value": 3.0})
