"""``HOST:PORT`` addresses: the one parser for every listen address and connect target."""

from __future__ import annotations

import ipaddress

__all__ = ["join_host_port", "parse_host_port"]

_EXAMPLE = "must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"


def _fail(key: str, value: object, hint: str) -> ValueError:
    return ValueError(f"{key}: {_EXAMPLE} (got {value!r}); hint: {hint}")


def parse_host_port(value: object, *, key: str, allow_port_zero: bool = True) -> tuple[str, int]:
    """Split ``HOST:PORT`` into ``(host, port)``; an IPv6 host is written ``[::1]:PORT``.

    The host comes back without brackets (``"::1"``), ready to bind or connect
    to. Port 0 (any free port, for a listen address) is accepted unless
    ``allow_port_zero`` is False (a connect target). ``key`` names the setting
    in the ``ValueError``: ``key: must be HOST:PORT, e.g. ... (got 'x'); hint: ...``.
    """
    if not isinstance(value, str):
        raise _fail(key, value, 'write it as a quoted string, e.g. "127.0.0.1:8080"')
    if not value or any(ch.isspace() for ch in value):
        raise _fail(key, value, "give a host and a port without spaces")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise _fail(key, value, "give both a host and a port, separated by ':'")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise _fail(key, value, f"the port must be a number 0-65535, not {port!r}")
    if int(port) == 0 and not allow_port_zero:
        raise _fail(key, value, "give the port the server listens on; 0 is not a real port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            msg = f"brackets are only for IPv6 addresses; {host!r} is not one"
            raise _fail(key, value, msg) from None
    elif "[" in host or "]" in host:
        raise _fail(key, value, "brackets go around a whole IPv6 address, e.g. [::1]:8080")
    elif ":" in host:
        raise _fail(key, value, f"put an IPv6 address in brackets: [{host}]:{port}")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """``HOST:PORT`` again, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
