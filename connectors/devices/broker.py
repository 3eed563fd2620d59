"""Start a loopback MQTT broker for ``edgesieve demo``: mosquitto when installed, else amqtt.

:class:`~connectors.devices.mosquitto.Mosquitto` runs the real binary;
:class:`~connectors.devices.embedded.EmbeddedBroker` (amqtt, from the ``demo``
extra) is imported only when it is wanted, so this module and the CLI work
without amqtt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from connectors.devices.broker_auth import EdgeAccount, check_auth_pair, write_mosquitto_config
from connectors.devices.mosquitto import Mosquitto
from connectors.devices.registry import DeviceRegistry

if TYPE_CHECKING:
    from connectors.devices.embedded import EmbeddedBroker

__all__ = ["start_broker"]

logger = logging.getLogger("edgesieve.broker")


def _embedded_broker(kind: str) -> type[EmbeddedBroker]:
    """The embedded broker class, or a one-line error naming the extra that brings amqtt."""
    try:
        from connectors.devices.embedded import EmbeddedBroker
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != "amqtt":
            raise
        why = "mosquitto is not installed and " if kind == "auto" else ""
        msg = (
            f"start_broker (kind={kind!r}): {why}the embedded MQTT broker needs amqtt, which "
            "is not installed; hint: pip install 'edgesieve[demo]'"
            + (" or apt-get install mosquitto" if kind == "auto" else "")
        )
        raise ValueError(msg) from None
    return EmbeddedBroker


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

    :raises ValueError: when the embedded broker is wanted (or is the only
        one left) and amqtt is not installed.
    """
    check_auth_pair(registry, edge, "start_broker")
    if kind == "mosquitto" or (kind == "auto" and Mosquitto.available()):
        if registry is None or edge is None:
            return Mosquitto(data_dir, port=port).start()
        passwd, acl = write_mosquitto_config(registry, edge, Path(data_dir))
        return Mosquitto(data_dir, port=port, password_file=passwd, acl_file=acl).start()
    embedded = _embedded_broker(kind)
    if kind == "auto":
        logger.info("mosquitto is not installed; using the embedded amqtt broker")
    return embedded(data_dir, port=port, registry=registry, edge=edge).start()
