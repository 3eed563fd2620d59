"""An embedded amqtt MQTT broker on loopback, for machines without mosquitto.

MQTT 3.1.1 only, no persistence, no shared subscriptions. Given a
:class:`~connectors.devices.registry.DeviceRegistry` and the edge's
:class:`~connectors.devices.broker_auth.EdgeAccount`, two amqtt plugins
(:class:`RegistryAuthPlugin`, :class:`RegistryTopicPlugin`) enforce the device
API's rules by asking an :class:`~connectors.devices.broker_auth.AccessPolicy`.

amqtt comes with the ``demo`` extra (``pip install 'edgesieve[demo]'``);
:func:`~connectors.devices.broker.start_broker` imports this module only when
the embedded broker is wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from connectors.devices.broker_auth import AccessPolicy, EdgeAccount, check_auth_pair
from connectors.devices.loopback import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    LoopbackBroker,
    check_loopback,
    check_port,
    free_port,
)
from connectors.devices.registry import DeviceRegistry

if TYPE_CHECKING:
    from amqtt.session import Session

__all__ = ["EmbeddedBroker", "RegistryAuthPlugin", "RegistryTopicPlugin"]

logger = logging.getLogger("edgesieve.broker")

_AMQTT_SHUTDOWN_S = 2.0
"""How long the embedded broker may shut down gracefully before its tasks are cancelled."""

_PRINCIPAL = "edgesieve.user"
"""``Session.attributes`` key: the user name the session authenticated as."""


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


class EmbeddedBroker(LoopbackBroker):
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
        check_loopback(host, "EmbeddedBroker")
        check_port(port, "EmbeddedBroker")
        check_auth_pair(registry, edge, "EmbeddedBroker")
        self._policy = (
            AccessPolicy(registry, edge) if registry is not None and edge is not None else None
        )
        self._data_dir = Path(data_dir) if data_dir is not None else None
        self._host = host
        self._port = port or free_port(host)
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
            future.result(timeout=START_TIMEOUT_S)
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
                future.result(timeout=STOP_TIMEOUT_S)
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=STOP_TIMEOUT_S)
        if thread is None or not thread.is_alive():
            loop.close()

    def __repr__(self) -> str:
        return f"EmbeddedBroker(url={self.url!r})"
