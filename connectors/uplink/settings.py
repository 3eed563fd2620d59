"""Settings of the uplink sender: where and how it connects, and how fast it may send."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from connectors.common.address import parse_host_port

__all__ = ["UplinkSettings"]


def _positive_number(name: str, value: object, hint: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        msg = f"UplinkSettings.{name} must be a positive number of seconds; got {value!r}. {hint}"
        raise ValueError(msg)


def _metadata_value(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        msg = f"UplinkSettings.{name} must be a non-empty string; got {type(value).__name__}"
        raise ValueError(msg)
    if any(not " " <= ch <= "~" for ch in value):
        msg = (
            f"UplinkSettings.{name} must be printable ASCII because it travels as gRPC "
            f"metadata; it contains a character outside 0x20-0x7E. Hint: generate it with "
            "secrets.token_urlsafe()"
        )
        raise ValueError(msg)


@dataclass(frozen=True)
class UplinkSettings:
    """Where and how the sender connects; the secret is left out of ``repr``.

    ``target`` is ``HOST:PORT`` (or any gRPC target URI such as
    ``dns:///host:port``). TLS is on when ``tls_ca`` (the CA that signed the
    receiver's certificate; None with a client certificate means the system
    roots) or ``tls_cert``/``tls_key`` (client certificate for mutual TLS, both
    or neither) are set; ``tls_server_name`` overrides the name checked in the
    receiver's certificate. ``window`` is how many batches may be in flight
    without an ``Ack``; ``ack_timeout_s`` is how long the stream may go
    without any ``Ack`` while batches are in flight before it is reopened (it
    must exceed the time the link needs to carry one batch).
    """

    target: str
    key: str
    secret: str = field(repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    bandwidth_bytes_per_s: int | None = None
    window: int = 32
    tls_server_name: str | None = None
    ack_timeout_s: float = 120.0
    expire_interval_s: float = 60.0

    def __post_init__(self) -> None:
        target = self.target
        if not isinstance(target, str) or ("://" not in target and not target.startswith("unix:")):
            parse_host_port(target, key="UplinkSettings.target", allow_port_zero=False)
        elif any(ch.isspace() for ch in target):
            msg = (
                f"UplinkSettings.target: a gRPC target URI has no spaces (got {target!r}); "
                "hint: dns:///cloud.example:50051"
            )
            raise ValueError(msg)
        _metadata_value("key", self.key)
        _metadata_value("secret", self.secret)
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str | Path):
                    msg = f"UplinkSettings.{name} must be a path or None; got {value!r}"
                    raise TypeError(msg)
                object.__setattr__(self, name, Path(value))
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = (
                "UplinkSettings: set both tls_cert and tls_key for mutual TLS, or neither; got "
                f"tls_cert={self.tls_cert}, tls_key={self.tls_key}"
            )
            raise ValueError(msg)
        _positive_number("backoff_min_s", self.backoff_min_s, "Hint: 0.5")
        _positive_number("backoff_max_s", self.backoff_max_s, "Hint: 60")
        if self.backoff_max_s < self.backoff_min_s:
            msg = (
                f"UplinkSettings.backoff_max_s ({self.backoff_max_s}) must not be smaller than "
                f"backoff_min_s ({self.backoff_min_s})"
            )
            raise ValueError(msg)
        rate = self.bandwidth_bytes_per_s
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            msg = (
                f"UplinkSettings.bandwidth_bytes_per_s must be a positive int or None "
                f"(unlimited); got {rate!r}"
            )
            raise ValueError(msg)
        window = self.window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            msg = f"UplinkSettings.window must be an int >= 1 (batches in flight); got {window!r}"
            raise ValueError(msg)
        _positive_number("ack_timeout_s", self.ack_timeout_s, "Hint: 120")
        _positive_number("expire_interval_s", self.expire_interval_s, "Hint: 60")
        if self.tls_server_name is not None and not isinstance(self.tls_server_name, str):
            msg = (
                "UplinkSettings.tls_server_name must be a string or None; got "
                f"{self.tls_server_name!r}"
            )
            raise TypeError(msg)

    @property
    def tls(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls_ca is not None or self.tls_cert is not None
