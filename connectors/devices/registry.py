"""The device registry (``devices.yaml``): device ids and their access tokens.

```yaml
devices:
  - {id: pump-7, token: "s3cr3t-token-7"}
  - {id: gw-1, token: "gateway-token-1", gateway: {devices: ["line-1-*"]}}
```

A gateway entry (ThingsBoard's gateway API) may speak for the device names
matching one of its ``fnmatch`` patterns (case-sensitive).

Tokens are looked up by their SHA-256 digest and confirmed with a
constant-time comparison; they never appear in logs, errors or ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from connectors.common.yamlfile import read_entries

__all__ = ["Device", "DeviceRegistry", "RegistryError"]

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""A device id: it becomes an MQTT topic level and a username, so no ``/ + #``."""

MIN_TOKEN_LENGTH = 8
MAX_TOKEN_LENGTH = 256


class RegistryError(ValueError):
    """The device registry is invalid; the message names the file and entry."""


@dataclass(frozen=True)
class Device:
    """One registered device."""

    id: str
    token: str = field(repr=False)
    gateway: tuple[str, ...] | None = None
    """For a gateway: the ``fnmatch`` patterns of the device names it may speak for."""

    def __repr__(self) -> str:
        gateway = "" if self.gateway is None else f", gateway={list(self.gateway)!r}"
        return f"Device(id={self.id!r}{gateway})"

    def speaks_for(self, name: str) -> bool:
        """Whether this gateway may send data of device ``name`` (False for a plain device)."""
        return self.gateway is not None and any(fnmatchcase(name, p) for p in self.gateway)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class DeviceRegistry:
    """Registered devices, checked at load: unique ids and tokens, sane formats."""

    def __init__(self, devices: Iterable[Device], *, source: str = "devices") -> None:
        self._devices: dict[str, Device] = {}
        self._by_digest: dict[bytes, Device] = {}
        for index, device in enumerate(devices):
            where = f"{source}: devices[{index}]"
            if not isinstance(device.id, str) or not DEVICE_ID.fullmatch(device.id):
                msg = (
                    f"{where}: id {device.id!r} is not a valid device id; use 1-128 letters, "
                    "digits, '.', '_', ':' or '-' (it becomes an MQTT topic level)"
                )
                raise RegistryError(msg)
            token = device.token
            if not isinstance(token, str) or not MIN_TOKEN_LENGTH <= len(token) <= MAX_TOKEN_LENGTH:
                got = type(token).__name__ if not isinstance(token, str) else f"{len(token)} chars"
                msg = (
                    f"{where} ({device.id}): token must be a string of {MIN_TOKEN_LENGTH}-"
                    f"{MAX_TOKEN_LENGTH} characters (got {got}); generate one with "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
                )
                raise RegistryError(msg)
            if any(c.isspace() or c in "/?#" for c in token):
                msg = (
                    f"{where} ({device.id}): token contains whitespace, '/', '?' or '#', which "
                    "cannot travel in a URL path; use URL-safe characters"
                )
                raise RegistryError(msg)
            if device.id in self._devices:
                msg = f"{where}: device id {device.id!r} is listed twice; ids must be unique"
                raise RegistryError(msg)
            digest = _digest(token)
            if digest in self._by_digest:
                other = self._by_digest[digest].id
                msg = (
                    f"{where} ({device.id}): token is the same as device {other!r}'s; "
                    "every device needs its own token"
                )
                raise RegistryError(msg)
            self._devices[device.id] = device
            self._by_digest[digest] = device

    @classmethod
    def load(cls, path: str | Path) -> DeviceRegistry:
        """Read and check ``devices.yaml``."""
        path = Path(path)
        entries = read_entries(
            path,
            "devices",
            ("id", "token"),
            optional=("gateway",),
            what="device registry",
            missing_hint="set `devices:` in the config",
            example="devices: [{id: pump-7, token: ...}]",
            error=RegistryError,
        )
        devices = []
        for index, entry in enumerate(entries):
            device_id = entry["id"]
            if not isinstance(device_id, str):
                msg = (
                    f"{path}: devices[{index}]: id must be a string, but YAML read "
                    f'{device_id!r} ({type(device_id).__name__}); quote it, e.g. id: "pump-7"'
                )
                raise RegistryError(msg)
            devices.append(Device(device_id, entry["token"], _gateway(entry, path, index)))
        return cls(devices, source=str(path))

    def authenticate(self, token: str) -> str | None:
        """The device id for ``token``, or None; comparison in constant time."""
        device = self.lookup(token)
        return None if device is None else device.id

    def lookup(self, token: str) -> Device | None:
        """The registry entry for ``token`` (with its gateway patterns), or None; constant time."""
        device = self._by_digest.get(_digest(token))
        if device is None:
            return None
        if hmac.compare_digest(
            device.token.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass")
        ):
            return device
        return None

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __repr__(self) -> str:
        return f"DeviceRegistry({len(self)} devices)"


def _gateway(entry: dict[str, object], path: Path, index: int) -> tuple[str, ...] | None:
    """The checked ``gateway: {devices: [pattern, ...]}`` of one entry, or None."""
    if "gateway" not in entry:
        return None
    section = entry["gateway"]
    patterns = section.get("devices") if isinstance(section, dict) else None
    if (
        not isinstance(section, dict)
        or set(section) != {"devices"}
        or not isinstance(patterns, list)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        msg = (
            f"{path}: devices[{index}]: gateway must be a mapping with a non-empty `devices:` "
            f"list of device name patterns (got {section!r}); "
            'e.g. gateway: {devices: ["line-1-*"]}'
        )
        raise RegistryError(msg)
    return tuple(patterns)
