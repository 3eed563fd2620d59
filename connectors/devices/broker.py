"""MQTT brokers on loopback for tests and ``edgesieve demo``.

:class:`Mosquitto` runs the real ``mosquitto`` binary with persistence, so
persistent sessions and queued QoS 1 messages survive :meth:`Mosquitto.restart`.
:class:`EmbeddedBroker` runs an amqtt broker in a background thread for
machines without mosquitto (MQTT 3.1.1 only, no persistence, no shared
subscriptions). :func:`start_broker` picks whichever is available.

Given a :class:`~connectors.devices.registry.DeviceRegistry` and the edge's
:class:`~connectors.devices.broker_auth.EdgeAccount`, both brokers enforce the
device API's rules (:mod:`connectors.devices.broker_auth`): mosquitto through the
password and ACL files written into its data directory, the embedded broker
through two amqtt plugins that ask an :class:`~connectors.devices.broker_auth.AccessPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal, Self

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from connectors.devices.broker_auth import AccessPolicy, EdgeAccount, write_mosquitto_config
from connectors.devices.registry import DeviceRegistry

if TYPE_CHECKING:
    from amqtt.session import Session

__all__ = ["EmbeddedBroker", "Mosquitto", "start_broker"]

logger = logging.getLogger("edgesieve.broker")

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 2_000
_AMQTT_SHUTDOWN_S = 2.0
"""How long the embedded broker may shut down gracefully before its tasks are cancelled."""


def _free_port(host: str) -> int:
    """Ask the OS for a free TCP port on ``host`` (bound and released at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection right now."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"mqtt://{shown}:{port}"


def _check_loopback(host: str, where: str) -> None:
    if host not in ("127.0.0.1", "::1", "localhost"):
        msg = (
            f"{where}: host must be a loopback address, got {host!r}; "
            "hint: use '127.0.0.1' or '::1' (these brokers are for tests and the demo)"
        )
        raise ValueError(msg)


class _Broker(ABC):
    """What both loopback brokers share: address, start/stop, restart, context manager."""

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
        return _url(self._host, self._port)

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


class Mosquitto(_Broker):
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
        _check_loopback(host, "Mosquitto")
        if not 0 <= port <= 65_535:
            msg = f"Mosquitto: port must be 0..65535 (0 = pick a free one), got {port!r}"
            raise ValueError(msg)
        for name, path in (("password_file", password_file), ("acl_file", acl_file)):
            if path is not None and not Path(path).is_file():
                msg = (
                    f"Mosquitto: {name} {str(path)!r} does not exist; "
                    "hint: create it first (mosquitto_passwd -c -b FILE USER PASSWORD)"
                )
                raise ValueError(msg)
        self._data_dir = Path(data_dir)
        self._host = host
        self._port = port or _free_port(host)
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
            "max_queued_messages 1000000",
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
        deadline = time.monotonic() + _START_TIMEOUT_S
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
                proc.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto on %s ignored SIGTERM; killing it", self.url)
                proc.kill()
                proc.wait(timeout=_STOP_TIMEOUT_S)
        elif proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __repr__(self) -> str:
        return f"Mosquitto(url={self.url!r}, data_dir={str(self._data_dir)!r})"


_PRINCIPAL = "edgesieve.user"
"""``Session.attributes`` key: the user name the session authenticated as."""


def _check_auth_pair(registry: DeviceRegistry | None, edge: EdgeAccount | None, where: str) -> None:
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


class RegistryAuthPlugin(BaseAuthPlugin):
    """amqtt plugin: log in devices (id + token) and the edge account; refuse everyone else.

    The authenticated user name is kept in the session's attributes (the topic
    plugin trusts it, not the name a later CONNECT for the same client id
    claims). A persistent session belongs to the user who created it: another
    user asking for it is refused. A will whose topic the user may not publish
    is dropped, as mosquitto does.
    """

    @dataclass
    class Config:
        """Plugin settings: the policy shared with :class:`RegistryTopicPlugin`."""

        policy: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        """Whether the session's credentials belong to a device or to the edge account."""
        policy: AccessPolicy = self.config.policy
        user = policy.authenticate(session.username, session.password)
        if user is None:
            logger.info(
                "embedded broker: refused client %r: unknown user %r or wrong password",
                session.client_id,
                session.username,
            )
            return False
        owner = session.attributes.get(_PRINCIPAL)
        if owner is not None and owner != user:
            logger.warning(
                "embedded broker: refused client %r logging in as %r: its persistent session "
                "belongs to user %r",
                session.client_id,
                user,
                owner,
            )
            return False
        if session.will_flag and not policy.allowed(user, "write", session.will_topic or ""):
            logger.warning(
                "embedded broker: client %r (user %r) may not publish its will topic %r; "
                "the will is dropped",
                session.client_id,
                user,
                session.will_topic,
            )
            session.will_flag = False
            session.will_retain = False
        session.attributes[_PRINCIPAL] = user
        return True


class RegistryTopicPlugin(BaseTopicPlugin):
    """amqtt plugin: the device API's topic rules on every publish, subscribe and delivery.

    amqtt does not implement shared subscriptions (``$share/...`` would be a
    literal filter that never matches), so they are refused outright instead
    of being granted and silently never delivered.
    """

    @dataclass
    class Config:
        """Plugin settings: the policy shared with :class:`RegistryAuthPlugin`."""

        policy: Any = None

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        """Whether the authenticated user of ``session`` may do ``action`` on ``topic``."""
        policy: AccessPolicy = self.config.policy
        user = session.attributes.get(_PRINCIPAL) if session is not None else None
        if user is None or not topic:
            return False
        if action == Action.PUBLISH:
            allowed = policy.allowed(user, "write", topic)
        elif action == Action.RECEIVE:
            allowed = policy.allowed(user, "read", topic)
        elif action == Action.SUBSCRIBE:
            if topic.startswith("$share/"):
                logger.warning(
                    "embedded broker: refused shared subscription %r of user %r: amqtt does "
                    "not implement shared subscriptions; hint: run mosquitto for several workers",
                    topic,
                    user,
                )
                return False
            allowed = policy.may_subscribe(user, topic)
        else:
            return False
        if not allowed:
            logger.info("embedded broker: denied %s of %r to user %r", action, topic, user)
        return allowed


async def _cancel_other_tasks() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class EmbeddedBroker(_Broker):
    """An amqtt MQTT 3.1.1 broker on loopback, in a thread with its own event loop.

    Without ``registry`` anonymous clients are allowed and every topic is
    open. With ``registry`` and ``edge`` only devices (user name = device id,
    password = token) and the edge account log in, and the rules of
    :mod:`connectors.devices.broker_auth` hold for publish, subscribe and delivery.
    There is no persistence. ``data_dir`` is accepted for interface parity
    with :class:`Mosquitto` and is not used.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        registry: DeviceRegistry | None = None,
        edge: EdgeAccount | None = None,
    ) -> None:
        _check_loopback(host, "EmbeddedBroker")
        if not 0 <= port <= 65_535:
            msg = f"EmbeddedBroker: port must be 0..65535 (0 = pick a free one), got {port!r}"
            raise ValueError(msg)
        _check_auth_pair(registry, edge, "EmbeddedBroker")
        self._policy = (
            AccessPolicy(registry, edge) if registry is not None and edge is not None else None
        )
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._host = host
        self._port = port or _free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def authenticated(self) -> bool:
        """Whether clients must log in (a registry was given)."""
        return self._policy is not None

    @property
    def running(self) -> bool:
        """Whether the broker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _plugins(self) -> dict[str, dict[str, Any]]:
        if self._policy is None:
            return {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        config = {"policy": self._policy}
        return {
            f"{__name__}.{RegistryAuthPlugin.__name__}": config,
            f"{__name__}.{RegistryTopicPlugin.__name__}": config,
        }

    async def _start_broker(self) -> None:
        from amqtt.broker import Broker

        bind = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
        config = {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            "plugins": self._plugins(),
        }
        self._broker = Broker(config, loop=asyncio.get_running_loop())
        await self._broker.start()

    def start(self) -> Self:
        """Start the broker thread and wait (at most 10 s) until the port accepts connections.

        :raises RuntimeError: when the broker does not start in time.
        """
        if self.running:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"amqtt-broker-{self._port}", daemon=True
        )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start_broker(), loop)
        try:
            future.result(timeout=_START_TIMEOUT_S)
        except Exception as exc:
            self.stop()
            msg = (
                f"EmbeddedBroker.start: amqtt broker on {self.url} did not start: {exc}; "
                "hint: is the port already in use?"
            )
            raise RuntimeError(msg) from exc
        logger.info("embedded amqtt broker listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Shut the broker down and end its thread."""
        loop, thread, broker = self._loop, self._thread, self._broker
        self._loop = self._thread = self._broker = None
        if loop is None:
            return
        if broker is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=_AMQTT_SHUTDOWN_S)
        if loop.is_running():
            # amqtt's shutdown can hang on a connected client's reader, and it leaves the
            # waiters of refused clients pending; end them all before the loop closes, or
            # they fail noisily ("Event loop is closed") when collected.
            future = asyncio.run_coroutine_threadsafe(_cancel_other_tasks(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=_STOP_TIMEOUT_S)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=_STOP_TIMEOUT_S)
        if thread is None or not thread.is_alive():
            loop.close()

    def __repr__(self) -> str:
        return f"EmbeddedBroker(url={self.url!r})"


def start_broker(
    data_dir: Path,
    *,
    port: int = 0,
    kind: Literal["auto", "mosquitto", "embedded"] = "auto",
    registry: DeviceRegistry | None = None,
    edge: EdgeAccount | None = None,
) -> Mosquitto | EmbeddedBroker:
    """Start a loopback broker: ``mosquitto`` when installed (``auto``), else the embedded one.

    With ``registry`` and ``edge`` the broker admits only the registered
    devices and the edge account and enforces the device API's topic rules;
    for mosquitto the password and ACL files are written into ``data_dir``.
    """
    _check_auth_pair(registry, edge, "start_broker")
    if kind == "mosquitto" or (kind == "auto" and Mosquitto.available()):
        if registry is None or edge is None:
            return Mosquitto(data_dir, port=port).start()
        passwd, acl = write_mosquitto_config(registry, edge, Path(data_dir))
        return Mosquitto(data_dir, port=port, password_file=passwd, acl_file=acl).start()
    if kind == "auto":
        logger.info("mosquitto is not installed; using the embedded amqtt broker")
    return EmbeddedBroker(data_dir, port=port, registry=registry, edge=edge).start()
