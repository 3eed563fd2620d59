"""Config and environment problems at start: one line naming the key, exit status 2, no traceback.

Each test runs the real command in a subprocess (``edgesieve run``, ``python
-m bytewax.run``, ``edgesieve demo``, ``edgesieve cloud``) against real
sockets held by the test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import DEVICES, write_devices

ROOT = Path(__file__).parents[2]
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")

PARENT_CHECKS_OFF = (
    "import sys\n"
    "import flows.api, flows.cli, flows.config\n"
    "def unchecked(*args, **kwargs):\n"
    "    return None\n"
    "flows.config.check_environment = flows.api.check_environment = unchecked\n"
    "flows.cli.check_environment = unchecked\n"
    "sys.exit(flows.cli.main(sys.argv[1:]))\n"
)
"""``edgesieve`` with the start checks of the flow process turned off: the fault injected is a
port taken after the checks passed, so the ingest process's own bind is what fails."""


def run(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 90
) -> tuple[int, str]:
    """Run ``cmd``; return its exit status and its one error line (asserting there is just one)."""
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line and not LOG_LINE.match(line)]
    assert len(errors) == 1, done.stderr
    return done.returncode, errors[0]


def edgesieve(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


@contextmanager
def held(kind: socket.SocketKind = socket.SOCK_STREAM) -> Iterator[str]:
    """A loopback port another program holds, as ``HOST:PORT``."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def in_use(key: str, address: str) -> str:
    port = address.rsplit(":", 1)[1]
    return (
        f"{key}: {address} is in use (Address already in use); hint: stop the program that "
        f"holds port {port} or choose another port"
    )


def config(tmp_path: Path, body: str) -> Path:
    devices = write_devices(tmp_path, DEVICES)
    path = tmp_path / "edge.yaml"
    path.write_text(f"data_dir: {tmp_path / 'var'}\ndevices: {devices}\n{body}")
    return path


def test_metrics_listen_without_a_port(tmp_path):
    path = config(
        tmp_path, 'metrics_listen: localhost\ntransports: {http: {listen: "127.0.0.1:0"}}\n'
    )
    code, line = run(edgesieve("run", "flows.telemetry", "-c", str(path)))
    assert code == 2
    assert line == (
        f"edgesieve: error: {path}: metrics_listen: must be HOST:PORT, e.g. 127.0.0.1:8080 or "
        "[::1]:8080 (got 'localhost'); hint: give both a host and a port, separated by ':'"
    )


@pytest.mark.parametrize(
    ("section", "value", "hint"),
    [
        ("http", ":8080", "give both a host and a port, separated by ':'"),
        ("http", "127.0.0.1:70000", "the port must be a number 0-65535, not '70000'"),
        ("coap", "127.0.0.1:coap", "the port must be a number 0-65535, not 'coap'"),
        ("coap", "::1:5683", "put an IPv6 address in brackets: [::1]:5683"),
    ],
)
def test_a_bad_listen_address(tmp_path, section, value, hint):
    path = config(tmp_path, f'transports: {{{section}: {{listen: "{value}"}}}}\n')
    code, line = run(edgesieve("run", "flows.edge", "-c", str(path)))
    assert code == 2
    assert line == (
        f"edgesieve: error: {path}: transports.{section}.listen: must be HOST:PORT, e.g. "
        f"127.0.0.1:8080 or [::1]:8080 (got {value!r}); hint: {hint}"
    )


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("metrics_listen", socket.SOCK_STREAM),
        ("transports.http.listen", socket.SOCK_STREAM),
        ("transports.coap.listen", socket.SOCK_DGRAM),
    ],
)
def test_a_port_in_use(tmp_path, key, kind):
    with held(kind) as address:
        if key == "metrics_listen":
            body = f'metrics_listen: "{address}"\ntransports: {{http: {{listen: "127.0.0.1:0"}}}}\n'
        else:
            body = f'transports: {{{key.split(".")[1]}: {{listen: "{address}"}}}}\n'
        path = config(tmp_path, body)
        code, line = run(edgesieve("run", "flows.edge", "-c", str(path)))
    assert code == 2
    assert line == f"edgesieve: error: {path}: {in_use(key, address)}"
    assert not (tmp_path / "var" / "journal").exists(), "nothing may start before the checks"


def test_data_dir_is_a_file(tmp_path):
    path = config(tmp_path, 'transports: {http: {listen: "127.0.0.1:0"}}\n')
    (tmp_path / "var").write_text("")
    code, line = run(edgesieve("run", "flows.telemetry", "-c", str(path)))
    assert code == 2
    assert line == (
        f"edgesieve: error: {path}: data_dir: {tmp_path / 'var'} is a file, not a directory; "
        "hint: point data_dir at a directory the edge may write to (it is created if missing) "
        "or move the file away"
    )


def test_a_bad_device_registry(tmp_path):
    path = config(tmp_path, 'transports: {http: {listen: "127.0.0.1:0"}}\n')
    (tmp_path / "devices.yaml").write_text("devices: [{id: d1, token: short}]\n")
    code, line = run(edgesieve("run", "flows.edge", "-c", str(path)))
    assert code == 2
    assert line.startswith(
        f"edgesieve: error: {path}: devices: {tmp_path / 'devices.yaml'}: devices[0] (d1): "
        "token must be a string of 8-256 characters (got 5 chars)"
    )


def test_bytewax_runner_reports_the_same_line(tmp_path):
    with held() as address:
        path = config(tmp_path, f'transports: {{http: {{listen: "{address}"}}}}\n')
        code, line = run(
            [sys.executable, "-m", "bytewax.run", "flows.edge"],
            env={"EDGESIEVE_CONFIG": str(path)},
        )
    assert code == 2
    assert line == f"edgesieve: error: {path}: {in_use('transports.http.listen', address)}"


def test_a_port_taken_after_the_checks_stops_the_edge_with_the_ingest_process_line(tmp_path):
    with held() as address:
        path = config(tmp_path, f'transports: {{http: {{listen: "{address}"}}}}\n')
        code, line = run(
            [sys.executable, "-c", PARENT_CHECKS_OFF, "run", "flows.edge", "-c", str(path)]
        )
    assert code == 2
    assert line == f"edgesieve: error: {in_use('transports.http.listen', address)}"


def test_bytewax_runner_stops_with_the_ingest_process_line(tmp_path):
    script = (
        "import runpy, sys\n"
        "import flows.runtime\n"
        "flows.runtime.check_environment = lambda *args, **kwargs: None\n"
        "sys.argv = ['bytewax.run', 'flows.edge']\n"
        "runpy.run_module('bytewax.run', run_name='__main__')\n"
    )
    with held() as address:
        path = config(tmp_path, f'transports: {{http: {{listen: "{address}"}}}}\n')
        code, line = run([sys.executable, "-c", script], env={"EDGESIEVE_CONFIG": str(path)})
    assert code == 2
    assert line == f"edgesieve: error: {in_use('transports.http.listen', address)}"


def test_a_metrics_port_taken_after_the_checks(tmp_path):
    with held() as address:
        path = config(
            tmp_path,
            f'metrics_listen: "{address}"\ntransports: {{http: {{listen: "127.0.0.1:0"}}}}\n',
        )
        code, line = run(
            [sys.executable, "-c", PARENT_CHECKS_OFF, "run", "flows.telemetry", "-c", str(path)]
        )
    assert code == 2
    assert line == f"edgesieve: error: {in_use('metrics_listen', address)}"


def test_demo_data_dir_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    code, line = run(edgesieve("demo", "--data-dir", str(tmp_path / "out")))
    assert code == 2
    assert line == (
        f"edgesieve: error: --data-dir: {tmp_path / 'out'} is a file, not a directory; hint: "
        "point --data-dir at a directory the edge may write to (it is created if missing) or "
        "move the file away"
    )


def test_cloud_listen_in_use(tmp_path):
    auth = tmp_path / "auth.yaml"
    auth.write_text('edges: [{key: edge-01, secret: "0123456789abcdef0123"}]\n')
    with held() as address:
        code, line = run(
            edgesieve(
                "cloud",
                "--listen",
                address,
                "--db",
                str(tmp_path / "c.duckdb"),
                "--auth",
                str(auth),
            )
        )
    assert code == 2
    assert line == f"edgesieve: error: {in_use('--listen', address)}"


def test_cloud_db_that_cannot_be_opened(tmp_path):
    auth = tmp_path / "auth.yaml"
    auth.write_text('edges: [{key: edge-01, secret: "0123456789abcdef0123"}]\n')
    (tmp_path / "afile").write_text("")
    code, line = run(
        edgesieve(
            "cloud",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "afile" / "c.duckdb"),
            "--auth",
            str(auth),
        )
    )
    assert code == 2
    assert line.startswith(
        f"edgesieve: error: cloud receiver cannot open its database '{tmp_path / 'afile' / 'c.duckdb'}'"
    )
