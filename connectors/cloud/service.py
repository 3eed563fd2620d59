"""The reference cloud receiver (``edgesieve cloud``): the gRPC ``Uplink`` service into DuckDB.

Edges push :class:`~protos.uplink_pb2.Batch` messages on one ``Push`` stream
and get one :class:`~protos.uplink_pb2.Ack` per batch, in order.

A call is authenticated first (:class:`~connectors.cloud.auth.EdgeAuth`): an
unknown key, a wrong secret or missing metadata ends it with
``UNAUTHENTICATED``. Transport security is plaintext, TLS, or mutual TLS
(:class:`~connectors.cloud.tls.ReceiverTls`).

Per batch the receiver answers (see :mod:`connectors.cloud.store`):

- ``REJECTED`` (with a one-line ``detail``) when the batch can never be
  stored: no ``batch_id``, an ``edge_id`` other than the authenticated key,
  a new stream whose name cannot be a table, bytes that are not a valid
  Arrow IPC stream, buffers that would expand past the batch size cap or
  more rows than the row cap (read from the IPC headers, before anything is
  decompressed), a ``rows`` count that disagrees with the Arrow data, a
  ``batch_id`` that is not the id of the batch's content, or columns that do
  not fit the stream's schema or its table. The stream stays open for the
  next batch.
- ``DUPLICATE`` when the edge's ``batch_id`` is already in ``uplink_batches``
  (an edge re-sending after a lost ``Ack``); nothing is decoded or written.

Per edge (:class:`~connectors.cloud.limits.ReceiverLimits`): batches beyond
the rate quota wait for their turn; a call beyond the edge's open-call limit,
or once the edge has its storage quota stored, ends with
``RESOURCE_EXHAUSTED`` and the reason, so the edge keeps its batches and
retries. A ``raw_bytes`` claim over the cap is stored but not credited. Every
refusal is counted per edge and reason in ``uplink_refusals``.
- ``STORED`` once the rows and their ``uplink_batches`` row are committed in
  one DuckDB transaction. Rows whose natural key is already stored (a replay
  after an edge crash sealed them again, under another ``batch_id``) are
  skipped in that transaction and counted in ``uplink_batches.duplicate_rows``.
  The ``Ack`` is sent only after the commit, so a receiver that dies in
  between is answered ``DUPLICATE`` on the re-send and the rows are stored
  exactly once.

A database error while writing (disk full, a table changed by hand) rolls the
transaction back and ends the call with ``INTERNAL``: the batch was not
stored, and the edge's outbox keeps it and retries.

Logs (logger ``edgesieve.cloud``): one line per batch at DEBUG, rejections
and refused calls at WARNING, one summary line per ``Push`` call at INFO.
Secrets never appear in logs, errors or ``repr``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import duckdb
import grpc

from connectors.cloud.auth import EdgeAuth, load_auth
from connectors.cloud.limits import DecodeBudget, EdgeQuotas, ReceiverLimits
from connectors.cloud.store import (
    BatchStore,
    Outcome,
    QuotaExceeded,
    ReceiverError,
    StoreFailed,
)
from connectors.cloud.tls import ReceiverTls
from connectors.common.address import join_host_port, parse_host_port
from connectors.uplink.wire import (
    DUPLICATE,
    REJECTED,
    STORED,
    UNAUTHENTICATED_DETAIL,
    status_name,
)
from protos import uplink_pb2, uplink_pb2_grpc

__all__ = ["CloudReceiver", "serve"]

logger = logging.getLogger("edgesieve.cloud")

DEFAULT_MAX_WORKERS = 32
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Stopping(Exception):
    """A call arrived while the receiver is stopping."""


class _Refused(Exception):
    """A call ended with ``RESOURCE_EXHAUSTED`` (a quota); ``args[0]`` is the detail."""


@dataclass
class _PushStats:
    batches: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    rows: int = 0
    duplicate_rows: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    paced: int = 0
    waited_s: float = 0.0

    def count(self, outcome: Outcome, wire_bytes: int) -> None:
        status = outcome.status
        self.batches += 1
        self.wire_bytes += wire_bytes
        if status == STORED:
            self.stored += 1
            self.rows += outcome.rows
            self.duplicate_rows += outcome.duplicates
            self.raw_bytes += outcome.raw_bytes
        elif status == DUPLICATE:
            self.duplicate += 1
        else:
            self.rejected += 1


class CloudReceiver:
    """The ``Uplink`` gRPC server storing pushed batches in a DuckDB file.

    ``listen`` is ``HOST:PORT`` (port 0 picks a free port; read it from
    :attr:`port` after :meth:`start`). ``edges`` maps edge keys to secrets
    (see :func:`~connectors.cloud.auth.load_auth`). ``on_commit(batch_id)`` is
    called after a batch's transaction commits and before its ``Ack`` is sent
    (if it raises, the call ends with that error; the batch stays stored and
    its re-send is a ``DUPLICATE``). At most ``max_workers`` ``Push`` calls run
    at once (one thread each); further calls are refused with
    ``RESOURCE_EXHAUSTED`` and retried by the edge. ``max_message_bytes``
    bounds one ``Batch`` message (larger ones end the call with
    ``RESOURCE_EXHAUSTED``). ``limits`` caps each batch and each edge
    (:class:`~connectors.cloud.limits.ReceiverLimits`; refusals are counted per
    edge in ``uplink_refusals``).
    """

    def __init__(
        self,
        listen: str,
        db: Path,
        edges: Mapping[str, str],
        *,
        tls: ReceiverTls | None = None,
        on_commit: Callable[[str], None] | None = None,
        max_workers: int = DEFAULT_MAX_WORKERS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        limits: ReceiverLimits | None = None,
    ) -> None:
        self._host, _ = parse_host_port(listen, key="CloudReceiver.listen")
        self._listen = listen
        self._db_path = Path(db)
        self._auth = EdgeAuth(edges)
        if not isinstance(max_workers, int) or max_workers < 1:
            msg = f"CloudReceiver max_workers must be an int >= 1; got {max_workers!r}"
            raise ValueError(msg)
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            msg = (
                f"CloudReceiver max_message_bytes must be an int >= 1024; got {max_message_bytes!r}"
            )
            raise ValueError(msg)
        if limits is not None and not isinstance(limits, ReceiverLimits):
            msg = f"CloudReceiver limits must be a ReceiverLimits; got {type(limits).__name__}"
            raise TypeError(msg)
        self._max_workers = max_workers
        self._max_message_bytes = max_message_bytes
        self.limits = limits if limits is not None else ReceiverLimits()
        self._quotas = EdgeQuotas(self.limits)
        self._stopping = threading.Event()
        self._decoding = DecodeBudget(self.limits.max_decoding_bytes, self._stopping)
        self._tls = tls
        self._tls_credentials = tls.server_credentials() if tls is not None else None
        self._on_commit = on_commit
        self._server: grpc.Server | None = None
        self._store: BatchStore | None = None
        self._port: int | None = None
        self._calls = threading.Condition()
        self._active = 0

    def __repr__(self) -> str:
        state = f"port {self._port}" if self._server is not None else "stopped"
        return f"CloudReceiver({self._listen!r}, db={str(self._db_path)!r}, {state})"

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when ``listen`` asked for port 0)."""
        if self._port is None:
            msg = "CloudReceiver.port is known only after start(); call start() first"
            raise RuntimeError(msg)
        return self._port

    @property
    def mode(self) -> str:
        """``plaintext``, ``TLS`` or ``mutual TLS``."""
        if self._tls is None:
            return "plaintext"
        return "mutual TLS" if self._tls.mutual else "TLS"

    def start(self) -> CloudReceiver:
        """Open the database, create ``uplink_batches`` if missing, bind and start serving."""
        if self._server is not None:
            return self
        store = BatchStore(self._db_path, self.limits)
        server = grpc.server(
            futures.ThreadPoolExecutor(self._max_workers, thread_name_prefix="edgesieve-cloud"),
            maximum_concurrent_rpcs=self._max_workers,
            options=[
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        uplink_pb2_grpc.add_UplinkServicer_to_server(_Servicer(self), server)
        try:
            if self._tls_credentials is None:
                port = server.add_insecure_port(self._listen)
            else:
                port = server.add_secure_port(self._listen, self._tls_credentials)
        except RuntimeError as exc:
            store.close()
            msg = (
                f"cloud receiver cannot listen on {self._listen!r}: {exc}. Hint: the port may "
                "be in use, or the host is not an address of this machine"
            )
            raise ReceiverError(msg) from None
        self._store = store
        self._stopping.clear()
        server.start()
        self._server = server
        self._port = port
        logger.info(
            "cloud receiver listening on %s (%s), storing to %s, %d edge(s) authorised",
            join_host_port(self._host, port),
            self.mode,
            self._db_path,
            len(self._auth),
        )
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, close the db."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.stop(grace).wait(grace + 5.0)
        deadline = time.monotonic() + grace + 5.0
        with self._calls:
            while self._active and time.monotonic() < deadline:
                self._calls.wait(max(0.0, deadline - time.monotonic()))
            if self._active:
                logger.warning(
                    "cloud receiver: %d Push call(s) still running at stop", self._active
                )
            store, self._store = self._store, None
        if store is not None:
            store.close()
        logger.info("cloud receiver on port %s stopped", self._port)

    def __enter__(self) -> CloudReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _enter_call(self) -> tuple[BatchStore, duckdb.DuckDBPyConnection]:
        with self._calls:
            store = self._store
            if store is None:
                msg = "the cloud receiver is stopping"
                raise _Stopping(msg)
            self._active += 1
            return store, store.cursor()

    def _leave_call(self, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.close()
        with self._calls:
            self._active -= 1
            self._calls.notify_all()

    def _push(
        self, edge: str, batches: Iterator[uplink_pb2.Batch], peer: str
    ) -> Iterator[uplink_pb2.Ack]:
        """Store the batches of one authenticated ``Push`` call, yielding one Ack each."""
        store, cursor = self._enter_call()
        stats = _PushStats()
        started = time.monotonic()
        ended = "cut short"
        entered = False
        try:
            entered = self._quotas.enter_call(edge)
            if not entered:
                self._refuse(
                    store,
                    cursor,
                    edge,
                    "calls",
                    f"edge {edge!r} already has {self.limits.edge_calls} Push calls open "
                    "(--edge-calls); an edge needs one; retry once the others have ended",
                )
            refusal = store.over_quota(edge)
            if refusal is not None:
                self._refuse(store, cursor, edge, "storage_quota", refusal)
            for batch in batches:
                outcome = self._handle(store, cursor, edge, batch, stats)
                stats.count(outcome, batch.ByteSize())
                yield uplink_pb2.Ack(
                    batch_id=batch.batch_id, status=outcome.status, detail=outcome.detail
                )
            ended = "ended"
        except _Refused:
            ended = "refused"
            raise
        finally:
            if entered:
                self._quotas.leave_call(edge)
            if stats.paced:
                with contextlib.suppress(StoreFailed, RuntimeError):
                    store.count_refusal(
                        cursor,
                        edge,
                        "rate_quota",
                        f"{stats.paced} batch(es) waited {stats.waited_s:.2f} s in all for the "
                        f"rate quota ({self.limits.edge_batches_per_s} batches/s, "
                        f"{self.limits.edge_bytes_per_s} bytes/s)",
                        stats.paced,
                    )
            self._leave_call(cursor)
            logger.info(
                "Push from edge %s (%s) %s after %.2f s: %d batch(es): %d stored, "
                "%d duplicate, %d rejected; %d rows, %d raw bytes stored, %d duplicate rows "
                "skipped, %d wire bytes received; %d batch(es) paced %.2f s by the rate quota",
                edge,
                peer,
                ended,
                time.monotonic() - started,
                stats.batches,
                stats.stored,
                stats.duplicate,
                stats.rejected,
                stats.rows,
                stats.raw_bytes,
                stats.duplicate_rows,
                stats.wire_bytes,
                stats.paced,
                stats.waited_s,
            )

    def _refuse(
        self,
        store: BatchStore,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        reason: str,
        detail: str,
    ) -> NoReturn:
        """Count a quota refusal of ``edge`` and end its call with ``RESOURCE_EXHAUSTED``."""
        logger.warning("edge %s: Push call refused (%s): %s", edge, reason, detail)
        store.count_refusal(cursor, edge, reason, detail)
        raise _Refused(detail)

    def _handle(
        self,
        store: BatchStore,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        stats: _PushStats,
    ) -> Outcome:
        checked = store.check(edge, batch)
        wait = self._quotas.pace(edge, 0 if isinstance(checked, Outcome) else checked)
        if wait > 0:
            stats.paced += 1
            stats.waited_s += wait
            if self._stopping.wait(wait):
                msg = "the cloud receiver is stopping"
                raise _Stopping(msg)
        if isinstance(checked, Outcome):
            outcome = checked
        elif store.seen(cursor, edge, batch.batch_id):
            outcome = Outcome(DUPLICATE)
        else:
            if not self._decoding.reserve(checked):
                msg = "the cloud receiver is stopping"
                raise _Stopping(msg)
            try:
                outcome = store.store(cursor, edge, batch, checked)
            except QuotaExceeded as exc:
                self._refuse(store, cursor, edge, "storage_quota", str(exc))
            finally:
                self._decoding.release(checked)
        status, detail = outcome.status, outcome.detail
        if outcome.reason:
            store.count_refusal(cursor, edge, outcome.reason, detail)
        if status == REJECTED:
            logger.warning(
                "edge %s: batch %r (%s) rejected: %s", edge, batch.batch_id, batch.stream, detail
            )
        elif status == STORED and outcome.reason:
            logger.warning(
                "edge %s: batch %r (%s) stored with a note: %s",
                edge,
                batch.batch_id,
                batch.stream,
                detail,
            )
        if status == STORED and self._on_commit is not None:
            self._on_commit(batch.batch_id)
        logger.debug(
            "edge %s: batch %r (%s, %d rows, %d raw bytes, %d wire bytes): %s",
            edge,
            batch.batch_id,
            batch.stream,
            batch.rows,
            batch.raw_bytes,
            batch.ByteSize(),
            status_name(status),
        )
        return outcome


class _Servicer(uplink_pb2_grpc.UplinkServicer):
    """gRPC glue: authenticate, then hand the request stream to the receiver."""

    def __init__(self, receiver: CloudReceiver) -> None:
        self._receiver = receiver

    def Push(  # noqa: N802 (the gRPC method name)
        self, request_iterator: Iterator[uplink_pb2.Batch], context: grpc.ServicerContext
    ) -> Iterator[uplink_pb2.Ack]:
        """Authenticate the call, then answer every batch with an Ack."""
        peer = context.peer()
        metadata: Any = [(m.key, m.value) for m in context.invocation_metadata() or ()]
        edge = self._receiver._auth.authenticate(metadata)
        if edge is None:
            logger.warning("refused Push from %s: %s", peer, self._receiver._auth.refusal(metadata))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL)
            return
        try:
            yield from self._receiver._push(edge, request_iterator, peer)
        except _Stopping:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud receiver is stopping; retry")
        except _Refused as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except StoreFailed as exc:
            logger.error("edge %s: storing failed, rolled back: %s", edge, exc)
            context.abort(
                grpc.StatusCode.INTERNAL,
                f"the receiver could not store {exc} (nothing was stored; retry later)",
            )


def serve(
    listen: str,
    db: Path,
    auth_file: Path,
    *,
    tls: ReceiverTls | None = None,
    limits: ReceiverLimits | None = None,
    stop: threading.Event,
) -> None:
    """Run the receiver until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT).

    Raises :class:`~connectors.cloud.auth.AuthError` for a bad auth file,
    ``ValueError`` for a bad listen address or TLS file,
    :class:`~connectors.cloud.store.ReceiverError` when the database cannot be
    opened or the address cannot be bound.
    """
    edges = load_auth(auth_file)
    with CloudReceiver(listen, db, edges, tls=tls, limits=limits):
        stop.wait()
