"""What the configuration needs from the machine: free addresses, a writable data_dir."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from pydantic import (
    BaseModel,
)

from connectors.common.address import parse_host_port
from flows.config.sections import ConfigError, EdgeConfig


def listen_problem(key: str, address: str, exc: OSError) -> str:
    """One line on why ``address``, the value of ``key``, could not be bound."""
    _, port = parse_host_port(address, key=key)
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{key}: {address} is in use ({reason}); hint: stop the program that holds "
            f"port {port} or choose another port"
        )
    if isinstance(exc, socket.gaierror):
        return (
            f"{key}: {address} names a host that does not resolve ({reason}); hint: use an "
            f"address of this machine, e.g. 127.0.0.1:{port}"
        )
    return (
        f"{key}: {address} cannot be bound ({reason}); hint: use an address of this "
        f"machine, e.g. 127.0.0.1:{port}"
    )


def bind_problem(key: str, address: str, kind: socket.SocketKind) -> str | None:
    """Why ``address`` cannot be bound the way its server will bind it, or None."""
    host, port = parse_host_port(address, key=key)
    try:
        family, type_, proto, _, sockaddr = socket.getaddrinfo(host, port, type=kind)[0]
        with socket.socket(family, type_, proto) as sock:
            if kind == socket.SOCK_STREAM:  # as the servers do: TIME_WAIT does not block
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
    except OSError as exc:
        return listen_problem(key, address, exc)
    return None


def listen_addresses(config: EdgeConfig) -> list[tuple[str, str, socket.SocketKind]]:
    """Every listen address of ``config``: ``(key path, HOST:PORT, TCP or UDP)``.

    A key named ``listen`` or ending in ``_listen`` at any depth is one; it is
    UDP under a ``coap`` section, TCP elsewhere.
    """
    found: list[tuple[str, str, socket.SocketKind]] = []

    def walk(section: BaseModel, path: tuple[str, ...]) -> None:
        for name in type(section).model_fields:
            value = getattr(section, name)
            where = (*path, name)
            if isinstance(value, BaseModel):
                walk(value, where)
            elif isinstance(value, str) and (name == "listen" or name.endswith("_listen")):
                kind = socket.SOCK_DGRAM if "coap" in path else socket.SOCK_STREAM
                found.append((".".join(where), value, kind))

    walk(config, ())
    return found


def data_dir_problem(path: Path, key: str = "data_dir") -> str | None:
    """Why ``path`` cannot serve as the data directory (created here if missing), or None."""
    hint = f"point {key} at a directory the edge may write to (it is created if missing)"
    if path.exists() and not path.is_dir():
        return f"{key}: {path} is a file, not a directory; hint: {hint} or move the file away"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{key}: {path} cannot be created ({exc.strerror or exc}); hint: {hint}"
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
    except OSError as exc:
        return f"{key}: {path} is not writable ({exc.strerror or exc}); hint: {hint}"
    probe.unlink()
    return None


def environment_problems(config: EdgeConfig) -> list[str]:
    """What :func:`check_environment` finds wrong, one line each (empty: all is well)."""
    problems: list[str] = []
    if (problem := data_dir_problem(config.data_dir)) is not None:
        problems.append(problem)
    if config.devices is not None:
        from connectors.devices.registry import DeviceRegistry

        try:
            DeviceRegistry.load(config.devices)
        except ValueError as exc:
            problems.append(f"devices: {exc}")
    for key, address, kind in listen_addresses(config):
        if (problem := bind_problem(key, address, kind)) is not None:
            problems.append(problem)
    return problems


def check_environment(config: EdgeConfig, *, source: str | None = None) -> None:
    """Check what only this machine can tell, just before a flow starts.

    ``data_dir`` must be a writable directory (it is created here), the device
    registry named by ``devices`` must be valid, and every listen address
    (:func:`listen_addresses`: ``metrics_listen``, ``transports.http.listen``,
    ``transports.coap.listen`` (UDP), ...) must be free to bind. All problems
    are raised together as one :class:`ConfigError`, prefixed with ``source:``
    (the config file) when given.
    """
    if problems := environment_problems(config):
        prefix = f"{source}: " if source else ""
        raise ConfigError(prefix + "; ".join(problems))
