"""Broker credentials and topic rules of the MQTT device API.

Devices log in with username = device id and password = access token; the
edge logs in with an account of its own (:class:`EdgeAccount`). One set of
rules says who may do what:

- a device publishes only its own data topics, ``v1/devices/{its id}/`` +
  ``telemetry``, ``vibration``, ``attributes`` or ``logs`` (:data:`DEVICE_CHANNELS`),
  and reads only ``v1/devices/{its id}/alarms``: it can neither speak for
  another device nor forge its own alarms;
- the edge reads every device's telemetry, vibration and attributes (also through shared
  subscriptions ``$share/{group}/...``) and publishes every device's alarms;
- anyone else, anonymous clients included, is refused.

:func:`write_mosquitto_config` renders the rules for mosquitto: a password file
in the mosquitto 2.x PBKDF2-SHA512 format (:func:`password_line`) and an ACL
file (:func:`acl_file`). :class:`AccessPolicy` applies the same rules in
process; the embedded amqtt broker uses it. Passwords and tokens are never
logged and never appear in errors or ``repr``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from connectors.devices.registry import DeviceRegistry

__all__ = [
    "ACL_FILE",
    "CONF_FILE",
    "FLOW_CONTROL_LINES",
    "DEVICE_CHANNELS",
    "DEVICE_RULES",
    "EDGE_RULES",
    "PASSWORD_FILE",
    "AccessPolicy",
    "EdgeAccount",
    "TopicRule",
    "acl_file",
    "check_auth_pair",
    "password_file",
    "mosquitto_conf",
    "password_line",
    "write_mosquitto_config",
]

PASSWORD_FILE = "passwd"
"""Name of the password file written by :func:`write_mosquitto_config`."""
ACL_FILE = "acl"
"""Name of the ACL file written by :func:`write_mosquitto_config`."""
CONF_FILE = "edgesieve.conf"
"""Name of the mosquitto.conf fragment written by :func:`write_mosquitto_config`."""
FLOW_CONTROL_LINES = ("max_inflight_messages 1000", "max_queued_messages 0")
"""mosquitto settings the edge relies on: it acknowledges a message only once it is
journaled, so up to 1000 unacknowledged messages may be in flight to it (as its MQTT 5
Receive Maximum says; mosquitto's default of 20 would throttle 3.1.1 clients), and the
rest of its persistent session is queued without a count limit (0), bounded by
``max_queued_bytes`` if set, rather than dropped."""

PBKDF2_ITERATIONS = 101
"""Iterations mosquitto 2.x uses for ``$7$`` (PBKDF2-SHA512) password hashes."""
SALT_BYTES = 12
HASH_BYTES = 64

EDGE_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""An edge account name: safe in a password file, an ACL ``user`` line and a topic."""
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256

Access = Literal["read", "write"]


@dataclass(frozen=True)
class TopicRule:
    """One ACL line: ``access`` to the topics ``topic`` matches (``%u`` = the user name)."""

    access: Access
    topic: str


EDGE_RULES: tuple[TopicRule, ...] = (
    TopicRule("read", "v1/devices/+/telemetry"),
    TopicRule("read", "v1/devices/+/vibration"),
    TopicRule("read", "v1/devices/+/attributes"),
    TopicRule("read", "v1/devices/+/logs"),
    TopicRule("write", "v1/devices/+/alarms"),
)
"""What the edge account may do."""

DEVICE_CHANNELS = ("telemetry", "vibration", "attributes", "logs")
"""The topics under ``v1/devices/{id}/`` a device publishes (ThingsBoard's device topic names)."""

DEVICE_RULES: tuple[TopicRule, ...] = (
    *(TopicRule("write", f"v1/devices/%u/{channel}") for channel in DEVICE_CHANNELS),
    TopicRule("read", "v1/devices/%u/alarms"),
)
"""What every device may do, ``%u`` being its own id (mosquitto ``pattern`` lines).

A device speaks only under its own id and only on its data topics: the
``alarms`` topic, which its subscribers trust to come from the edge, and any
other topic are denied, so a device can forge neither another device's data
nor its own alarms."""


@dataclass(frozen=True)
class EdgeAccount:
    """The edge's own MQTT account (it must not share its name with a device)."""

    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.username, str) or not EDGE_USERNAME.fullmatch(self.username):
            msg = (
                f"EdgeAccount.username: {self.username!r} is not a usable MQTT user name; "
                "use 1-128 letters, digits, '.', '_' or '-' (no ':', spaces, '/', '+', '#'); "
                "hint: e.g. 'edgesieve'"
            )
            raise ValueError(msg)
        password = self.password
        if (
            not isinstance(password, str)
            or not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH
        ):
            got = f"{len(password)} chars" if isinstance(password, str) else type(password).__name__
            msg = (
                f"EdgeAccount.password ({self.username}): must be a string of "
                f"{MIN_PASSWORD_LENGTH}-{MAX_PASSWORD_LENGTH} characters (got {got}); generate "
                "one with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
            )
            raise ValueError(msg)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def password_line(username: str, password: str, *, salt: bytes | None = None) -> str:
    """One line of a mosquitto 2.x password file: ``user:$7$101$<salt>$<hash>``.

    The hash is PBKDF2-HMAC-SHA512 over the UTF-8 password with 101
    iterations, a 12-byte salt (random unless given) and a 64-byte result,
    both in standard base64, exactly what ``mosquitto_passwd`` writes. The
    line has no trailing newline.
    """
    if (
        not isinstance(username, str)
        or not username
        or ":" in username
        or any(not c.isprintable() or c.isspace() for c in username)
    ):
        msg = (
            f"password_line: user name {username!r} cannot go in a mosquitto password file; "
            "it must be a non-empty string without ':', spaces or control characters "
            "(':' separates the user from the hash); hint: rename the user"
        )
        raise ValueError(msg)
    if not isinstance(password, str) or not password:
        got = "an empty string" if isinstance(password, str) else type(password).__name__
        msg = (
            f"password_line ({username}): the password must be a non-empty string, got {got}; "
            "hint: mosquitto refuses empty passwords"
        )
        raise ValueError(msg)
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    elif not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
        got = f"{len(salt)} bytes" if isinstance(salt, bytes) else type(salt).__name__
        msg = (
            f"password_line ({username}): salt must be {SALT_BYTES} bytes, got {got}; "
            "hint: leave it out for a random one"
        )
        raise ValueError(msg)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, HASH_BYTES
    )
    return f"{username}:$7${PBKDF2_ITERATIONS}${_b64(salt)}${_b64(digest)}"


def _check_edge(registry: DeviceRegistry, edge: EdgeAccount, where: str) -> None:
    if not isinstance(edge, EdgeAccount):
        msg = (
            f"{where}: edge must be an EdgeAccount, got {type(edge).__name__}; "
            "hint: EdgeAccount(username='edgesieve', password=...)"
        )
        raise TypeError(msg)
    if edge.username in registry:
        msg = (
            f"{where}: the edge account {edge.username!r} has the same name as a device in the "
            "registry; hint: pick another edge user name (device ids are MQTT user names too)"
        )
        raise ValueError(msg)


def check_auth_pair(registry: DeviceRegistry | None, edge: EdgeAccount | None, where: str) -> None:
    """Check that a broker gets both ``registry`` and ``edge`` (a real registry), or neither."""
    if (registry is None) != (edge is None):
        given, missing = ("registry", "edge") if edge is None else ("edge", "registry")
        msg = (
            f"{where}: {given}= was given without {missing}=; they go together; hint: the "
            "devices log in from the registry and the edge needs its own EdgeAccount to read them"
        )
        raise ValueError(msg)
    if registry is not None and not isinstance(registry, DeviceRegistry):
        msg = (
            f"{where}: registry must be a DeviceRegistry, got {type(registry).__name__}; "
            "hint: DeviceRegistry.load('devices.yaml')"
        )
        raise TypeError(msg)


def password_file(registry: DeviceRegistry, edge: EdgeAccount) -> str:
    """A mosquitto password file: the edge account, then every device with its token."""
    _check_edge(registry, edge, "password_file")
    lines = [password_line(edge.username, edge.password)]
    for device in registry:
        if ":" in device.id:
            msg = (
                f"password_file: device id {device.id!r} contains ':', which a mosquitto "
                "password file cannot hold (it separates the user from the hash); hint: "
                "rename the device, or use the embedded broker"
            )
            raise ValueError(msg)
        lines.append(password_line(device.id, device.token))
    return "\n".join(lines) + "\n"


def acl_file(edge: EdgeAccount) -> str:
    """A mosquitto ACL file with :data:`DEVICE_RULES` as patterns and :data:`EDGE_RULES`."""
    if not isinstance(edge, EdgeAccount):
        msg = (
            f"acl_file: edge must be an EdgeAccount, got {type(edge).__name__}; "
            "hint: EdgeAccount(username='edgesieve', password=...)"
        )
        raise TypeError(msg)
    lines = [
        "# mosquitto ACL of the edgesieve device API: a device (user name = device id)",
        "# publishes its own data topics and reads its own alarms; the edge reads every",
        "# device's telemetry, vibration, attributes and logs and publishes alarms. Anything else",
        "# is denied.",
        *(f"pattern {rule.access} {rule.topic}" for rule in DEVICE_RULES),
        "",
        f"user {edge.username}",
        *(f"topic {rule.access} {rule.topic}" for rule in EDGE_RULES),
    ]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600) so readers see the old or the new file, whole."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_mosquitto_config(
    registry: DeviceRegistry, edge: EdgeAccount, out_dir: Path
) -> tuple[Path, Path]:
    """Write ``passwd``, ``acl`` and ``edgesieve.conf`` into ``out_dir`` (mode 0600, atomically).

    ``edgesieve.conf`` (:func:`mosquitto_conf`) holds the lines for mosquitto.conf:
    the two files and the flow-control settings the edge relies on.

    :returns: the paths of the password file and the ACL file, for
        ``Mosquitto(password_file=..., acl_file=...)``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        msg = (
            f"write_mosquitto_config: out_dir {str(out_dir)!r} exists and is not a directory; "
            "hint: give the broker's data directory"
        )
        raise ValueError(msg)
    passwd_text = password_file(registry, edge)
    acl_text = acl_file(edge)
    out_dir.mkdir(parents=True, exist_ok=True)
    passwd_path = out_dir / PASSWORD_FILE
    acl_path = out_dir / ACL_FILE
    _write_atomic(passwd_path, passwd_text)
    _write_atomic(acl_path, acl_text)
    _write_atomic(out_dir / CONF_FILE, mosquitto_conf(passwd_path, acl_path))
    _fsync_dir(out_dir)
    return passwd_path, acl_path


def mosquitto_conf(passwd_path: Path, acl_path: Path) -> str:
    """The mosquitto.conf lines of the device API: the auth files and :data:`FLOW_CONTROL_LINES`."""
    lines = [
        "# edgesieve device API: include this file from mosquitto.conf",
        "allow_anonymous false",
        f"password_file {Path(passwd_path).resolve()}",
        f"acl_file {Path(acl_path).resolve()}",
        *FLOW_CONTROL_LINES,
    ]
    return "\n".join(lines) + "\n"


def _levels(topic: str) -> list[str]:
    return topic.split("/")


def _topic_matches(rule: list[str], topic: list[str]) -> bool:
    """Whether the rule filter matches the topic name (no wildcards in ``topic``)."""
    if topic and topic[0].startswith("$") and rule and rule[0] in ("+", "#"):
        return False
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(topic) or level not in ("+", topic[index]):
            return False
    return len(rule) == len(topic)


def _filter_covered(rule: list[str], wanted: list[str]) -> bool:
    """Whether every topic the filter ``wanted`` can match is matched by ``rule``."""
    for index, level in enumerate(rule):
        if level == "#":
            return True
        if index >= len(wanted):
            return False
        asked = wanted[index]
        if asked == "#" or (level != "+" and asked != level):
            return False
    return len(rule) == len(wanted)


def _unshare(topic_filter: str) -> str | None:
    """The filter behind ``$share/{group}/{filter}`` (None when malformed), else the filter."""
    if not topic_filter.startswith("$share/"):
        return topic_filter
    parts = topic_filter.split("/", 2)
    if len(parts) != 3 or not parts[1] or any(c in parts[1] for c in "+#") or not parts[2]:
        return None
    return parts[2]


class AccessPolicy:
    """The device API's broker rules, checked in process (what the ACL file tells mosquitto).

    :meth:`authenticate` maps credentials to a user name; the other methods
    take that user name and answer for one topic or topic filter.
    """

    def __init__(self, registry: DeviceRegistry, edge: EdgeAccount) -> None:
        if not isinstance(registry, DeviceRegistry):
            msg = (
                f"AccessPolicy: registry must be a DeviceRegistry, got {type(registry).__name__}; "
                "hint: DeviceRegistry.load('devices.yaml')"
            )
            raise TypeError(msg)
        _check_edge(registry, edge, "AccessPolicy")
        self._registry = registry
        self._edge = edge

    @property
    def edge_username(self) -> str:
        """User name of the edge account."""
        return self._edge.username

    def authenticate(self, username: str | None, password: str | bytes | None) -> str | None:
        """The user name when ``password`` is that user's, else None (constant-time compare)."""
        if not username or password is None:
            return None
        if isinstance(password, bytes):
            try:
                password = password.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if username == self._edge.username:
            ok = hmac.compare_digest(
                self._edge.password.encode("utf-8"), password.encode("utf-8", "surrogatepass")
            )
            return username if ok else None
        return username if self._registry.authenticate(password) == username else None

    def _rules(self, username: str) -> Iterator[TopicRule]:
        if username == self._edge.username:
            yield from EDGE_RULES
        elif username in self._registry:
            for rule in DEVICE_RULES:
                yield TopicRule(rule.access, rule.topic.replace("%u", username))

    def allowed(self, username: str, access: Access, topic: str) -> bool:
        """Whether ``username`` may ``read`` (receive) or ``write`` (publish) the topic name."""
        if not topic or "+" in topic or "#" in topic:
            return False
        levels = _levels(topic)
        return any(
            rule.access == access and _topic_matches(_levels(rule.topic), levels)
            for rule in self._rules(username)
        )

    def may_subscribe(self, username: str, topic_filter: str) -> bool:
        """Whether every topic ``topic_filter`` can match is readable by ``username``.

        A shared subscription ``$share/{group}/{filter}`` is checked by its filter.
        """
        inner = _unshare(topic_filter) if topic_filter else None
        if inner is None:
            return False
        wanted = _levels(inner)
        return any(
            rule.access == "read" and _filter_covered(_levels(rule.topic), wanted)
            for rule in self._rules(username)
        )

    def __repr__(self) -> str:
        return f"AccessPolicy(edge={self._edge.username!r}, {len(self._registry)} devices)"
