"""ThingsBoard's own Python SDK as a test client, run from its own virtualenv.

``tb-mqtt-client`` installs a fork of paho under the module name ``paho``, which
clashes with the paho-mqtt the edge and its tests use. So the SDK lives in
``.venv-tb`` at the repository root (git-ignored), created on first use and reused
while it holds the pinned version, and every SDK client runs as a subprocess of
that virtualenv's Python.

A client script is plain Python run with ``python -I -c``. It finds its inputs in
``params`` (a dict, JSON-encoded on the command line), reports with ``say(obj)`` (one
JSON line on stdout) and waits for the test with ``hear()`` (one JSON line on
stdin). :meth:`TBSdk.run` runs a script to its end and returns what it said last;
:meth:`TBSdk.start` gives a :class:`SdkScript` to talk to step by step.
"""

from __future__ import annotations

import fcntl
import json
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

SDK_PACKAGE = "tb-mqtt-client"
SDK_VERSION = "1.13.14"
VENV = ROOT / ".venv-tb"
"""The SDK's virtualenv (git-ignored)."""
INSTALL_TIMEOUT_S = 240.0
SCRIPT_TIMEOUT_S = 60.0
"""How long one SDK script may run (the SDK waits up to 5 s for ``getSessionLimits``)."""

_MARK = "@@tb "
"""The prefix of the lines a script says (the SDK may print, the test reads only these)."""

PRELUDE = f"""\
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(name)s %(levelname)s %(message)s")
params = json.loads(sys.argv[1])
def say(obj):
    sys.stdout.write({_MARK!r} + json.dumps(obj) + "\\n")
    sys.stdout.flush()
def hear():
    line = sys.stdin.readline()
    if not line:
        sys.exit("the test closed the script's stdin before telling it to go on")
    return json.loads(line)
def wait_until(cond, what, timeout=15.0):
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            sys.exit(f"timed out after {{timeout:g}}s waiting for {{what}}")
        time.sleep(0.01)
def published(info, timeout=15.0):
    # TBPublishInfo.get() waits 1 s at most and gives the publish call's code; PUBACK is
    # is_published() of every part
    rc = info.get()
    parts = info.message_info if isinstance(info.message_info, list) else [info.message_info]
    try:
        wait_until(lambda: all(p.is_published() for p in parts), "the PUBACK", timeout)
    except SystemExit:
        pass
    return {{"rc": rc, "acked": bool(parts) and all(p.is_published() for p in parts)}}
def connack_codes(client):
    # every CONNACK reason code of an SDK client, recorded before the SDK handles it
    codes = []
    inner = client._client.on_connect
    def on_connect(c, userdata, flags, code, *rest):
        codes.append(int(getattr(code, "value", code)))
        inner(c, userdata, flags, code, *rest)
    client._client.on_connect = on_connect
    return codes
def session_limits(client):
    # every answer to the SDK's getSessionLimits RPC
    answers = []
    inner = client.service_configuration_callback
    def record(rpc_id, response, *args, **kwargs):
        answers.append(dict(response) if isinstance(response, dict) else response)
        return inner(rpc_id, response, *args, **kwargs)
    client.service_configuration_callback = record
    return answers
"""
"""What every script starts with: logging to stderr, ``params``, ``say``, ``hear``, ``published``.

``published(info)`` is ``{"rc": info.get(), "acked": every part PUBACKed}`` for the
``TBPublishInfo`` a send returned; ``wait_until(cond, what)`` exits the script on timeout;
``connack_codes(client)`` and ``session_limits(client)`` give lists that fill with every
CONNACK reason code and every ``getSessionLimits`` answer of an SDK MQTT client (call them
before ``connect``).
"""


def _installed_version(python: Path) -> str | None:
    """The SDK version installed in the virtualenv of ``python`` (None: none, or no venv)."""
    if not python.exists():
        return None
    probe = f"import importlib.metadata as m; print(m.version({SDK_PACKAGE!r}))"
    proc = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _fail(step: str, proc: subprocess.CompletedProcess[str]) -> None:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    last = lines[-1] if lines else "no output"
    pytest.fail(
        f"cannot create the ThingsBoard SDK virtualenv {VENV}: {step} failed "
        f"(exit {proc.returncode}): {last}; hint: the tests install {SDK_PACKAGE}=={SDK_VERSION} "
        "from the package index (pip's PIP_INDEX_URL applies); delete the folder to start over",
        pytrace=False,
    )


def sdk_venv() -> TBSdk:
    """The SDK's virtualenv, created (or repaired) when it does not hold the pinned version.

    Fails the test -- never skips -- when it cannot be created. A lock file keeps
    two test sessions from building it at once.
    """
    python = VENV / "bin" / "python"
    with open(ROOT / ".venv-tb.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_version(python) != SDK_VERSION:
            steps = [
                ("python -m venv", [sys.executable, "-m", "venv", "--clear", str(VENV)]),
                (
                    f"pip install {SDK_PACKAGE}=={SDK_VERSION}",
                    [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
                    + [f"{SDK_PACKAGE}=={SDK_VERSION}"],
                ),
            ]
            for step, cmd in steps:
                try:
                    proc = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
                    )
                except subprocess.TimeoutExpired:
                    proc = subprocess.CompletedProcess(
                        cmd, -1, "", f"timed out after {INSTALL_TIMEOUT_S:g}s"
                    )
                if proc.returncode != 0:
                    _fail(step, proc)
            found = _installed_version(python)
            if found != SDK_VERSION:
                _fail(
                    "checking the installed version",
                    subprocess.CompletedProcess([], 1, "", f"found {found!r}, not {SDK_VERSION}"),
                )
    return TBSdk(python)


@dataclass(frozen=True)
class TBSdk:
    """Runs client scripts with the SDK's Python."""

    python: Path

    def start(self, script: str, **params: Any) -> SdkScript:
        """Start ``script`` (after :data:`PRELUDE`) with ``params``; talk to it step by step."""
        proc = subprocess.Popen(
            [str(self.python), "-I", "-c", PRELUDE + script, json.dumps(params)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=VENV,  # nothing of the repository on its path
        )
        return SdkScript(proc).watch()

    def run(self, script: str, *, timeout: float = SCRIPT_TIMEOUT_S, **params: Any) -> Any:
        """Run ``script`` to its end (it must exit 0); what it said last."""
        return self.start(script, **params).finish(timeout)


@dataclass
class SdkScript:
    """A running client script: what it says, what it logs, and its end."""

    proc: subprocess.Popen[str]
    said: list[Any] = field(default_factory=list)
    _lines: queue.Queue[Any] = field(default_factory=queue.Queue)
    _stderr: list[str] = field(default_factory=list)

    def watch(self) -> SdkScript:
        """Start the threads that collect stdout (its JSON lines) and stderr (its log)."""
        assert self.proc.stdout is not None and self.proc.stderr is not None

        def out() -> None:
            for line in self.proc.stdout:
                if line.startswith(_MARK):
                    self._lines.put(json.loads(line[len(_MARK) :]))
            self._lines.put(_EOF)

        threading.Thread(target=out, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        return self

    @property
    def log(self) -> str:
        """The script's stderr so far (the SDK's log and any traceback)."""
        return "".join(self._stderr)

    def _failure(self, what: str) -> None:
        self.kill()
        pytest.fail(f"ThingsBoard SDK script {what}; its log:\n{self.log[-4000:]}", pytrace=False)

    def next(self, timeout: float = SCRIPT_TIMEOUT_S) -> Any:
        """The next thing the script says; fails when it ends or is silent for ``timeout`` s."""
        try:
            obj = self._lines.get(timeout=timeout)
        except queue.Empty:
            self._failure(f"said nothing within {timeout:g}s")
        if obj is _EOF:
            self._lines.put(_EOF)
            self.proc.wait(10)
            self._failure(
                f"ended (exit {self.proc.returncode}) before saying what the test expected"
            )
        self.said.append(obj)
        return obj

    def tell(self, obj: Any = None) -> None:
        """Send ``obj`` (JSON) to the script's :func:`hear`."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = SCRIPT_TIMEOUT_S) -> Any:
        """Wait for the script's end (exit 0); what it said last (None: nothing)."""
        deadline = time.monotonic() + timeout
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._failure(f"did not end within {timeout:g}s")
        if code != 0:
            self._failure(f"exited with status {code}")
        while True:
            try:
                obj = self._lines.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                self._failure("ended but its output did not close")
            if obj is _EOF:
                break
            self.said.append(obj)
        return self.said[-1] if self.said else None

    def kill(self) -> None:
        """Kill the script if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


_EOF = object()
"""Put on the queue when the script's stdout closes."""
