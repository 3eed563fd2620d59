import shutil
import subprocess
import sys
from pathlib import Path

from protos import uplink_pb2

ROOT = Path(__file__).parents[2]
GENERATED = ("uplink_pb2.py", "uplink_pb2.pyi", "uplink_pb2_grpc.py")


def test_checked_in_stubs_match_the_proto(tmp_path):
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "uplink.proto", tmp_path / "protos" / "uplink.proto")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
         "--pyi_out=.", "protos/uplink.proto"],
        cwd=tmp_path, check=True, timeout=60,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), f"{name} is stale: run ./dev.sh protos"


def test_batch_round_trips():
    batch = uplink_pb2.Batch(edge_id="edge-01", batch_id="b1", stream="alarms", priority=0, rows=3,
                             arrow_ipc=b"\x00", raw_bytes=1000, created_at_us=1)
    again = uplink_pb2.Batch.FromString(batch.SerializeToString())
    assert again == batch
    assert uplink_pb2.Ack.Status.Name(uplink_pb2.Ack.DUPLICATE) == "DUPLICATE"
