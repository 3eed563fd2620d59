"""What the loopback MQTT brokers share: a loopback address, start/stop and restart.

:class:`~connectors.devices.mosquitto.Mosquitto` and
:class:`~connectors.devices.embedded.EmbeddedBroker` are for tests and
``edgesieve demo``; they only ever listen on a loopback address.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

__all__ = ["LoopbackBroker", "check_loopback", "check_port", "free_port"]

START_TIMEOUT_S = 10.0
"""How long a broker may take to accept connections."""
STOP_TIMEOUT_S = 10.0
"""How long a broker may take to stop."""


def free_port(host: str) -> int:
    """Ask the OS for a free TCP port on ``host`` (bound and released at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_loopback(host: str, where: str) -> None:
    """Refuse any ``host`` but a loopback address."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        msg = (
            f"{where}: host must be a loopback address, got {host!r}; "
            "hint: use '127.0.0.1' or '::1' (these brokers are for tests and the demo)"
        )
        raise ValueError(msg)


def check_port(port: int, where: str) -> None:
    """Refuse a port outside 0..65535 (0 picks a free one)."""
    if not 0 <= port <= 65_535:
        msg = f"{where}: port must be 0..65535 (0 = pick a free one), got {port!r}"
        raise ValueError(msg)


class LoopbackBroker(ABC):
    """A broker on a loopback port: address, start/stop, restart, context manager."""

    _host: str
    _port: int

    @property
    def port(self) -> int:
        """TCP port the broker listens on."""
        return self._port

    @property
    def host(self) -> str:
        """Loopback address the broker listens on."""
        return self._host

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the broker."""
        shown = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{shown}:{self._port}"

    @abstractmethod
    def start(self) -> Self:
        """Start the broker and wait until it accepts connections."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the broker."""

    def restart(self) -> Self:
        """Stop and start again on the same port (mosquitto keeps its persistence)."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
