"""A real ``mosquitto`` broker process on a loopback port, with persistence.

Persistent sessions and queued QoS 1 messages survive :meth:`Mosquitto.restart`.
Given the password and ACL files :func:`~connectors.devices.broker_auth.write_mosquitto_config`
writes, it enforces the device API's rules.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import IO, Self

from connectors.devices.broker_auth import FLOW_CONTROL_LINES
from connectors.devices.loopback import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    LoopbackBroker,
    check_loopback,
    check_port,
    free_port,
)

__all__ = ["Mosquitto"]

logger = logging.getLogger("edgesieve.broker")

_LOG_TAIL_CHARS = 2_000


def _accepts(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection right now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto(LoopbackBroker):
    """A ``mosquitto`` broker process on a loopback port, with persistence.

    ``port=0`` picks a free ephemeral port once; the same port is used again
    by :meth:`restart`. The configuration, the persistence database and the
    broker log (``mosquitto.log``) live in ``data_dir``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        password_file: Path | None = None,
        acl_file: Path | None = None,
    ) -> None:
        check_loopback(host, "Mosquitto")
        check_port(port, "Mosquitto")
        for name, path in (("password_file", password_file), ("acl_file", acl_file)):
            if path is not None and not Path(path).is_file():
                msg = (
                    f"Mosquitto: {name} {str(path)!r} does not exist; "
                    "hint: create it first (mosquitto_passwd -c -b FILE USER PASSWORD)"
                )
                raise ValueError(msg)
        self._data_dir = Path(data_dir)
        self._host = host
        self._port = port or free_port(host)
        self._password_file = Path(password_file).resolve() if password_file else None
        self._acl_file = Path(acl_file).resolve() if acl_file else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether the ``mosquitto`` binary is installed."""
        return Mosquitto.binary() is not None

    @staticmethod
    def binary() -> str | None:
        """Path of the ``mosquitto`` binary (also looked up in ``/usr/sbin``), or None."""
        return shutil.which("mosquitto") or shutil.which(
            "mosquitto", path="/usr/sbin:/usr/local/sbin"
        )

    @property
    def data_dir(self) -> Path:
        """Directory holding the config, the persistence database and the log."""
        return self._data_dir

    @property
    def config_path(self) -> Path:
        """Path of the generated ``mosquitto.conf``."""
        return self._data_dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """Path of the broker log (stdout and stderr of the process)."""
        return self._data_dir / "mosquitto.log"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        persist = self._data_dir / "persistence"
        persist.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self._port} {self._host}",
            f"allow_anonymous {'false' if self._password_file else 'true'}",
            "persistence true",
            f"persistence_location {persist}/",
            "autosave_interval 1",
            "autosave_on_changes false",
            *FLOW_CONTROL_LINES,
            "max_queued_bytes 0",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self._password_file:
            lines.append(f"password_file {self._password_file}")
        if self._acl_file:
            lines.append(f"acl_file {self._acl_file}")
        if os.geteuid() == 0:
            # Started as root, mosquitto would drop to user "mosquitto" and could
            # not write its persistence database into data_dir.
            lines.append("user root")
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """Last ``chars`` characters of the broker log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def _logged_since(self, offset: int, needle: str) -> bool:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return needle.encode() in log.read()
        except OSError:
            return False

    def start(self) -> Self:
        """Start the broker and wait until its port accepts connections.

        :raises RuntimeError: when the binary is missing, or the broker exits
            or does not listen within 10 s (the message holds its log tail).
        """
        if self.running:
            return self
        binary = self.binary()
        if binary is None:
            msg = (
                "Mosquitto.start: the 'mosquitto' binary was not found on PATH or in /usr/sbin; "
                "hint: install it (apt-get install mosquitto) or use EmbeddedBroker"
            )
            raise RuntimeError(msg)
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._log = self.log_path.open("ab")
        log_start = self._log.tell()
        self._proc = subprocess.Popen(
            [binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if (
                self._logged_since(log_start, " running")
                and _accepts(self._host, self._port)
                and self._proc.poll() is None
            ):
                logger.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)
                return self
            time.sleep(0.02)
        code = self._proc.poll()
        self.stop()
        state = f"exited with code {code}" if code is not None else "did not listen in time"
        msg = (
            f"Mosquitto.start: broker on {self.url} {state} "
            f"(config {self.config_path}); log tail:\n{self.log_tail()}"
        )
        raise RuntimeError(msg)

    def stop(self) -> None:
        """Stop the broker with SIGTERM (it saves persistence) and wait for it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto on %s ignored SIGTERM; killing it", self.url)
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        elif proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        return f"Mosquitto(url={self.url!r}, data_dir={str(self._data_dir)!r})"
