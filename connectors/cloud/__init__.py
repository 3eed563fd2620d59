"""The reference cloud receiver: the gRPC ``Uplink`` service storing batches in DuckDB."""

from connectors.cloud.auth import AuthError, EdgeAuth, EdgeCredentials, load_auth
from connectors.cloud.limits import ReceiverLimits
from connectors.cloud.service import CloudReceiver, serve
from connectors.cloud.store import BATCHES_TABLE, REFUSALS_TABLE, ReceiverError
from connectors.cloud.tls import ReceiverTls

__all__ = [
    "BATCHES_TABLE",
    "REFUSALS_TABLE",
    "AuthError",
    "CloudReceiver",
    "EdgeAuth",
    "EdgeCredentials",
    "ReceiverError",
    "ReceiverLimits",
    "ReceiverTls",
    "load_auth",
    "serve",
]
