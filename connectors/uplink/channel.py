"""The uplink sender's gRPC channel: credentials, options, closing, error hints."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc

from connectors.common.pem import read_pem
from connectors.uplink.settings import UplinkSettings

__all__ = ["ERROR_HINTS", "channel_credentials", "close_when_unwatched", "open_channel"]

MAX_ACK_MESSAGE_BYTES = 4 * 1024 * 1024
"""Largest message the sender accepts from the receiver (an ``Ack`` is tiny)."""

ERROR_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "check that the receiver runs and is reachable at the target; with TLS, check "
        "tls_ca, the server certificate's names and the client certificate"
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: "the network or the receiver is slow",
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        "the receiver is busy or this edge is over one of its quotas (the detail says which; "
        "the batches stay in the outbox until it has room), or a batch exceeds the receiver's "
        "message size limit (seal smaller batches with cloud.batch_rows)"
    ),
    grpc.StatusCode.UNIMPLEMENTED: "the target is not an edgesieve receiver (no Uplink.Push)",
}
"""A hint for the status codes a ``Push`` stream most often fails with."""


def channel_credentials(settings: UplinkSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials from the settings' PEM files, or None for plaintext."""
    if not settings.tls:
        return None
    pems: dict[str, bytes | None] = {}
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path: Path | None = getattr(settings, name)
        pems[name] = None if path is None else read_pem(path, key=f"UplinkSettings.{name}")
    return grpc.ssl_channel_credentials(
        root_certificates=pems["tls_ca"],
        private_key=pems["tls_key"],
        certificate_chain=pems["tls_cert"],
    )


def open_channel(
    settings: UplinkSettings, credentials: grpc.ChannelCredentials | None
) -> grpc.Channel:
    """A channel to ``settings.target``: secure with ``credentials``, else plaintext."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_ACK_MESSAGE_BYTES)]
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    if credentials is not None:
        return grpc.secure_channel(settings.target, credentials, options=options)
    return grpc.insecure_channel(settings.target, options=options)


def close_when_unwatched(channel: grpc.Channel) -> None:
    """Close ``channel`` once gRPC's connectivity poller has noticed the unsubscribe.

    The poller thread wakes every 0.2 s; closing the channel while it waits
    makes it die with "Cannot monitor channel state: Channel closed!". The
    close therefore runs on a short-lived daemon thread that waits for the
    poller to finish (at most 2 s).
    """

    def close() -> None:
        state = getattr(channel, "_connectivity_state", None)
        deadline = time.monotonic() + 2.0
        if state is None or not hasattr(state, "polling"):
            time.sleep(1.0)
        else:
            while state.polling and time.monotonic() < deadline:
                time.sleep(0.05)
        channel.close()

    threading.Thread(target=close, name="edgesieve-uplink-close", daemon=True).start()
