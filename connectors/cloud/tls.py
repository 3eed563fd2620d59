"""Transport security of the cloud receiver: plaintext, TLS or mutual TLS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from connectors.common.pem import read_pem

__all__ = ["ReceiverTls"]


@dataclass(frozen=True)
class ReceiverTls:
    """TLS settings of the receiver: PEM certificate chain and key; ``client_ca`` => mutual TLS.

    With ``client_ca`` set, every edge must present a certificate signed by
    that CA, in addition to its key and secret.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "client_ca"):
            value = getattr(self, name)
            if value is None and name == "client_ca":
                continue
            if not isinstance(value, str | Path):
                msg = f"ReceiverTls.{name} must be a path to a PEM file; got {type(value).__name__}"
                raise TypeError(msg)
            object.__setattr__(self, name, Path(value))

    @property
    def mutual(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read the PEM files into gRPC server credentials; ``ValueError`` names a bad file."""
        chain = read_pem(self.cert, key="ReceiverTls.cert")
        key = read_pem(self.key, key="ReceiverTls.key")
        root = None
        if self.client_ca is not None:
            root = read_pem(self.client_ca, key="ReceiverTls.client_ca")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=root, require_client_auth=root is not None
        )
