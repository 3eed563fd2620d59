"""The reference cloud receiver (``edgesieve cloud``): the gRPC ``Uplink`` service into DuckDB.

Edges push :class:`~protos.uplink_pb2.Batch` messages on one ``Push`` stream
and get one :class:`~protos.uplink_pb2.Ack` per batch, in order.

Authentication: every ``Push`` carries the call metadata ``x-edgesieve-key``
and ``x-edgesieve-secret``, checked against the auth file (:func:`load_auth`)
with a constant-time comparison before any batch is read. An unknown key, a
wrong secret or missing metadata ends the call with ``UNAUTHENTICATED``.
Transport security is plaintext, TLS, or mutual TLS (:class:`ReceiverTls`).

Per batch the receiver answers:

- ``REJECTED`` (with a one-line ``detail``) when the batch can never be
  stored: no ``batch_id``, an ``edge_id`` other than the authenticated key,
  an unknown stream, bytes that are not an Arrow IPC stream, a ``rows`` count
  that disagrees with the Arrow data, columns that do not fit the stream's
  schema (:data:`~connectors.streams.STREAMS`), or a ``batch_id`` already
  stored for another edge. The stream stays open for the next batch.
- ``DUPLICATE`` when the ``batch_id`` is already in ``uplink_batches`` (an
  edge re-sending after a lost ``Ack``); nothing is written.
- ``STORED`` once the rows and their ``uplink_batches`` row are committed in
  one DuckDB transaction. The ``Ack`` is sent only after the commit, so a
  receiver that dies in between is answered ``DUPLICATE`` on the re-send and
  the rows are stored exactly once. Extra Arrow columns that the stream does
  not define are not stored; the ``detail`` of the ``STORED`` ack names them.

A database error while writing (disk full, a table changed by hand) rolls the
transaction back and ends the call with ``INTERNAL``: the batch was not
stored, and the edge's outbox keeps it and retries.

Tables (DuckDB file given by ``--db``):

``uplink_batches``
    ``batch_id VARCHAR PRIMARY KEY``, ``edge_id``, ``stream``, ``rows``,
    ``raw_bytes`` (device payload bytes the batch stands for),
    ``wire_bytes`` (serialized size of the ``Batch`` message),
    ``received_at TIMESTAMPTZ`` (commit time, UTC), ``priority`` and
    ``created_at TIMESTAMPTZ`` (when the edge sealed the batch, NULL if unset).

one table per stream, named like the stream
    The stream's columns, in schema order and with the DuckDB types of their
    Arrow types (timestamps are ``TIMESTAMPTZ``), followed by ``edge_id`` and
    ``batch_id``. ``edge_id`` is kept on every row because device names are
    only unique within one edge, so almost every query filters or groups by
    it; ``batch_id`` ties each row to its ``uplink_batches`` row (accounting,
    audits, deleting one batch). A table is created with the first batch of
    its stream. Rows are inserted from the Arrow data in one statement.

Writes are serialised by one lock (one DuckDB writer at a time, which also
makes the duplicate check race-free); decoding and checking the Arrow data
runs concurrently on each ``Push`` call's thread, with its own DuckDB cursor.

Logs (logger ``edgesieve.cloud``): one line per batch at DEBUG, rejections
and refused calls at WARNING, one summary line per ``Push`` call at INFO.
Secrets never appear in logs, errors or ``repr``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import grpc
import pyarrow as pa

from connectors.common.address import join_host_port, parse_host_port
from connectors.common.pem import read_pem
from connectors.common.yamlfile import read_entries
from connectors.streams import STREAMS, StreamSpec, conform
from connectors.uplink.wire import (
    DUPLICATE,
    KEY_HEADER,
    MAX_BATCH_ID_LENGTH,
    REJECTED,
    SECRET_HEADER,
    STORED,
    UNAUTHENTICATED_DETAIL,
    status_name,
)
from protos import uplink_pb2, uplink_pb2_grpc

__all__ = [
    "AuthError",
    "CloudReceiver",
    "EdgeCredentials",
    "ReceiverError",
    "ReceiverTls",
    "load_auth",
    "serve",
]

logger = logging.getLogger("edgesieve.cloud")


EDGE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
"""An edge key: it is also the ``edge_id`` stored with every row."""
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 1024
_SECRET_CHARS = re.compile(r"[\x21-\x7e]+")
DEFAULT_MAX_WORKERS = 32
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

BATCHES_TABLE = "uplink_batches"
_EDGE_COLUMNS = ("edge_id", "batch_id")
_SECRET_HINT = "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
_ROWS_VIEW = "_edgesieve_rows"
_EMPTY_VIEW = "_edgesieve_empty"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class AuthError(ValueError):
    """The receiver's edge credentials are invalid; the message names the file and entry."""


class ReceiverError(RuntimeError):
    """The receiver cannot start: its database cannot be opened or its address bound."""


@dataclass(frozen=True)
class EdgeCredentials:
    """One edge allowed to push: its key (also its ``edge_id``) and secret."""

    key: str
    secret: str = field(repr=False)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _check_credentials(where: str, key: object, secret: object) -> None:
    """Raise :class:`AuthError` for a malformed key or secret (never showing the secret)."""
    if not isinstance(key, str) or not EDGE_KEY.fullmatch(key):
        msg = (
            f"{where}: key {key!r} is not a valid edge key; use 1-128 letters, digits, '.', "
            "'_', ':' or '-', starting with a letter or digit (it is the edge_id of its rows)"
        )
        raise AuthError(msg)
    if not isinstance(secret, str):
        msg = (
            f"{where} ({key}): secret must be a string, but got "
            f'{type(secret).__name__}; quote it in YAML, e.g. secret: "..."'
        )
        raise AuthError(msg)
    if not MIN_SECRET_LENGTH <= len(secret) <= MAX_SECRET_LENGTH:
        msg = (
            f"{where} ({key}): secret must be {MIN_SECRET_LENGTH}-{MAX_SECRET_LENGTH} "
            f"characters (got {len(secret)}); {_SECRET_HINT}"
        )
        raise AuthError(msg)
    if not _SECRET_CHARS.fullmatch(secret):
        msg = (
            f"{where} ({key}): secret contains spaces or characters outside printable ASCII, "
            f"which gRPC metadata cannot carry; {_SECRET_HINT}"
        )
        raise AuthError(msg)


def _check_all(where: str, credentials: Iterable[EdgeCredentials]) -> dict[str, str]:
    """Check every entry, unique keys and unique secrets; return ``{key: secret}``."""
    edges: dict[str, str] = {}
    by_digest: dict[bytes, str] = {}
    for index, creds in enumerate(credentials):
        entry = f"{where}[{index}]"
        _check_credentials(entry, creds.key, creds.secret)
        if creds.key in edges:
            msg = f"{entry}: edge key {creds.key!r} is listed twice; keys must be unique"
            raise AuthError(msg)
        digest = _digest(creds.secret)
        if digest in by_digest:
            msg = (
                f"{entry} ({creds.key}): secret is the same as edge {by_digest[digest]!r}'s; "
                f"every edge needs its own secret; {_SECRET_HINT}"
            )
            raise AuthError(msg)
        edges[creds.key] = creds.secret
        by_digest[digest] = creds.key
    if not edges:
        msg = (
            f"{where}: no edges are listed, so every Push would be refused; add one, e.g. "
            'edges: [{key: edge-01, secret: "..."}]'
        )
        raise AuthError(msg)
    return edges


_AUTH_EXAMPLE = 'edges: [{key: edge-01, secret: "..."}]'


def load_auth(path: str | Path) -> dict[str, str]:
    """Read and check the receiver's auth file; return ``{edge key: secret}``.

    The file is YAML ``edges: [{key: edge-01, secret: "..."}]``. Keys must be
    unique edge ids, secrets unique strings of printable ASCII of at least
    :data:`MIN_SECRET_LENGTH` characters. Raises :class:`AuthError` naming the
    file and the entry; secrets never appear in the message.
    """
    path = Path(path)
    entries = read_entries(
        path,
        "edges",
        ("key", "secret"),
        what="auth file",
        missing_hint=f"pass `--auth FILE` with a YAML file like {_AUTH_EXAMPLE}",
        example=_AUTH_EXAMPLE,
        error=AuthError,
        yaml_hint="; expected edges: [{key: ..., secret: ...}]",
    )
    credentials = []
    for index, entry in enumerate(entries):
        key = entry["key"]
        if not isinstance(key, str):
            msg = (
                f"{path}: edges[{index}]: key must be a string, but YAML read {key!r} "
                f'({type(key).__name__}); quote it, e.g. key: "edge-01"'
            )
            raise AuthError(msg)
        credentials.append(EdgeCredentials(key, entry["secret"]))
    return _check_all(f"{path}: edges", credentials)


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


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _from_us(us: int) -> datetime | None:
    if us <= 0:
        return None
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return None


class _Rejected(Exception):
    """A batch that will never be stored; ``args[0]`` is the Ack detail."""


@dataclass
class _PushStats:
    batches: int = 0
    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    rows: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0

    def count(self, status: int, rows: int, raw_bytes: int, wire_bytes: int) -> None:
        self.batches += 1
        self.wire_bytes += wire_bytes
        if status == STORED:
            self.stored += 1
            self.rows += rows
            self.raw_bytes += raw_bytes
        elif status == DUPLICATE:
            self.duplicate += 1
        else:
            self.rejected += 1


class CloudReceiver:
    """The ``Uplink`` gRPC server storing pushed batches in a DuckDB file.

    ``listen`` is ``HOST:PORT`` (port 0 picks a free port; read it from
    :attr:`port` after :meth:`start`). ``edges`` maps edge keys to secrets
    (see :func:`load_auth`). ``on_commit(batch_id)`` is called after a batch's
    transaction commits and before its ``Ack`` is sent (if it raises, the call
    ends with that error; the batch stays stored and its re-send is a
    ``DUPLICATE``). At most ``max_workers`` ``Push`` calls run at once (one
    thread each); further calls are refused with ``RESOURCE_EXHAUSTED`` and
    retried by the edge. ``max_message_bytes`` bounds one ``Batch`` message
    (larger ones end the call with ``RESOURCE_EXHAUSTED``).
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
    ) -> None:
        self._host, _ = parse_host_port(listen, key="CloudReceiver.listen")
        self._listen = listen
        self._db_path = Path(db)
        if not isinstance(edges, Mapping):
            msg = (
                f"CloudReceiver edges must be a mapping of edge key to secret; got "
                f"{type(edges).__name__}. Hint: edges=load_auth(path)"
            )
            raise TypeError(msg)
        checked = _check_all(
            "CloudReceiver edges", (EdgeCredentials(k, s) for k, s in edges.items())
        )
        self._secrets = {key: secret.encode("ascii") for key, secret in checked.items()}
        self._decoy = secrets.token_urlsafe(32).encode("ascii")
        if not isinstance(max_workers, int) or max_workers < 1:
            msg = f"CloudReceiver max_workers must be an int >= 1; got {max_workers!r}"
            raise ValueError(msg)
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1024:
            msg = (
                f"CloudReceiver max_message_bytes must be an int >= 1024; got {max_message_bytes!r}"
            )
            raise ValueError(msg)
        self._max_workers = max_workers
        self._max_message_bytes = max_message_bytes
        self._tls = tls
        self._tls_credentials = tls.server_credentials() if tls is not None else None
        self._on_commit = on_commit
        self._server: grpc.Server | None = None
        self._db: duckdb.DuckDBPyConnection | None = None
        self._port: int | None = None
        self._write_lock = threading.Lock()
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
        self._db = self._open_db()
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
            self._close_db()
            msg = (
                f"cloud receiver cannot listen on {self._listen!r}: {exc}. Hint: the port may "
                "be in use, or the host is not an address of this machine"
            )
            raise ReceiverError(msg) from None
        server.start()
        self._server = server
        self._port = port
        logger.info(
            "cloud receiver listening on %s (%s), storing to %s, %d edge(s) authorised",
            join_host_port(self._host, port),
            self.mode,
            self._db_path,
            len(self._secrets),
        )
        return self

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting calls, let running ones finish for ``grace`` seconds, close the db."""
        server, self._server = self._server, None
        if server is None:
            return
        server.stop(grace).wait(grace + 5.0)
        deadline = time.monotonic() + grace + 5.0
        with self._calls:
            while self._active and time.monotonic() < deadline:
                self._calls.wait(max(0.0, deadline - time.monotonic()))
            if self._active:
                logger.warning(
                    "cloud receiver: %d Push call(s) still running at stop", self._active
                )
        with self._write_lock:
            self._close_db()
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

    def _open_db(self) -> duckdb.DuckDBPyConnection:
        try:
            self._db_path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(self._db_path))
        except (duckdb.Error, OSError) as exc:
            msg = (
                f"cloud receiver cannot open its database {str(self._db_path)!r}: "
                f"{_one_line(exc)}. Hint: another `edgesieve cloud` may be using the file, or "
                "the directory is not writable"
            )
            raise ReceiverError(msg) from None
        try:
            con.execute(
                f"""
                CREATE TABLE IF NOT EXISTS {BATCHES_TABLE} (
                    batch_id VARCHAR PRIMARY KEY,
                    edge_id VARCHAR NOT NULL,
                    stream VARCHAR NOT NULL,
                    rows UBIGINT NOT NULL,
                    raw_bytes UBIGINT NOT NULL,
                    wire_bytes UBIGINT NOT NULL,
                    received_at TIMESTAMPTZ NOT NULL,
                    priority UINTEGER,
                    created_at TIMESTAMPTZ
                )
                """
            )
        except duckdb.Error as exc:
            con.close()
            msg = (
                f"cloud receiver cannot create {BATCHES_TABLE} in {str(self._db_path)!r}: "
                f"{_one_line(exc)}"
            )
            raise ReceiverError(msg) from None
        return con

    def _close_db(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The edge key the call metadata proves, or None; secrets compared in constant time."""
        given: dict[str, str | bytes] = {}
        for name, value in metadata:
            given[name.lower()] = value
        key = given.get(KEY_HEADER)
        secret = given.get(SECRET_HEADER)
        if not isinstance(key, str) or not isinstance(secret, str):
            return None
        expected = self._secrets.get(key)
        ok = hmac.compare_digest(
            expected if expected is not None else self._decoy,
            secret.encode("utf-8", "surrogatepass"),
        )
        return key if ok and expected is not None else None

    def _log_refusal(self, metadata: Iterable[Any], peer: str) -> None:
        """Log why a call was refused: never the secret, unknown keys cut to 64 characters."""
        given = {m.key.lower(): m.value for m in metadata}
        key = given.get(KEY_HEADER)
        if key is None or SECRET_HEADER not in given:
            reason = f"no {KEY_HEADER} / {SECRET_HEADER} metadata"
        elif isinstance(key, str) and key in self._secrets:
            reason = f"wrong secret for edge {key!r}"
        else:
            shown = key[:64] if isinstance(key, str) else type(key).__name__
            reason = f"unknown edge key {shown!r}"
        logger.warning("refused Push from %s: %s", peer, reason)

    def _enter_call(self) -> duckdb.DuckDBPyConnection:
        with self._calls:
            db = self._db
            if db is None:
                msg = "the cloud receiver is stopping"
                raise _Stopping(msg)
            self._active += 1
            return db.cursor()

    def _leave_call(self, cursor: duckdb.DuckDBPyConnection) -> None:
        cursor.close()
        with self._calls:
            self._active -= 1
            self._calls.notify_all()

    def _push(
        self, edge: str, batches: Iterator[uplink_pb2.Batch], peer: str
    ) -> Iterator[uplink_pb2.Ack]:
        """Store the batches of one authenticated ``Push`` call, yielding one Ack each."""
        cursor = self._enter_call()
        stats = _PushStats()
        started = time.monotonic()
        ended = "cut short"
        try:
            for batch in batches:
                try:
                    ack = self._handle(cursor, edge, batch)
                except duckdb.Error as exc:
                    msg = f"batch {batch.batch_id!r} ({batch.stream}): {_one_line(exc)}"
                    raise _StoreFailed(msg) from exc
                stats.count(ack.status, batch.rows, batch.raw_bytes, batch.ByteSize())
                yield ack
            ended = "ended"
        finally:
            self._leave_call(cursor)
            logger.info(
                "Push from edge %s (%s) %s after %.2f s: %d batch(es): %d stored, "
                "%d duplicate, %d rejected; %d rows, %d raw bytes stored, %d wire bytes received",
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
                stats.wire_bytes,
            )

    def _handle(
        self, cursor: duckdb.DuckDBPyConnection, edge: str, batch: uplink_pb2.Batch
    ) -> uplink_pb2.Ack:
        wire_bytes = batch.ByteSize()
        try:
            spec, table, extra = _decode(edge, batch)
            status, detail = self._store(cursor, edge, batch, spec, table, wire_bytes)
        except _Rejected as exc:
            status, detail = REJECTED, _one_line(exc.args[0])
            logger.warning(
                "edge %s: batch %r (%s) rejected: %s", edge, batch.batch_id, batch.stream, detail
            )
        else:
            if status == STORED and extra:
                detail = (
                    f"stored without column(s) {', '.join(extra)}, which stream "
                    f"{batch.stream!r} does not define"
                )
        logger.debug(
            "edge %s: batch %r (%s, %d rows, %d raw bytes, %d wire bytes): %s",
            edge,
            batch.batch_id,
            batch.stream,
            batch.rows,
            batch.raw_bytes,
            wire_bytes,
            status_name(status),
        )
        return uplink_pb2.Ack(batch_id=batch.batch_id, status=status, detail=detail)

    def _store(
        self,
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        spec: StreamSpec,
        table: pa.Table,
        wire_bytes: int,
    ) -> tuple[int, str]:
        """Write rows and the ``uplink_batches`` row in one transaction; call on_commit."""
        with self._write_lock:
            cursor.execute("BEGIN TRANSACTION")
            committed = False
            try:
                found = cursor.execute(
                    f"SELECT edge_id FROM {BATCHES_TABLE} WHERE batch_id = ?", [batch.batch_id]
                ).fetchall()
                seen = found[0] if found else None
                if seen is None:
                    self._insert(cursor, edge, batch, spec, table, wire_bytes)
                    cursor.execute("COMMIT")
                    committed = True
            finally:
                if not committed:
                    with contextlib.suppress(duckdb.Error):
                        cursor.execute("ROLLBACK")
                for view in (_ROWS_VIEW, _EMPTY_VIEW):
                    with contextlib.suppress(duckdb.Error):
                        cursor.unregister(view)
        if seen is not None:
            if seen[0] != edge:
                msg = (
                    f"batch_id {batch.batch_id!r} is already stored for another edge; "
                    "batch ids must be unique across edges (derive them from the edge id)"
                )
                raise _Rejected(msg)
            return DUPLICATE, ""
        if self._on_commit is not None:
            self._on_commit(batch.batch_id)
        return STORED, ""

    @staticmethod
    def _insert(
        cursor: duckdb.DuckDBPyConnection,
        edge: str,
        batch: uplink_pb2.Batch,
        spec: StreamSpec,
        table: pa.Table,
        wire_bytes: int,
    ) -> None:
        """Insert the rows (from Arrow, one statement) and the ``uplink_batches`` row.

        The Arrow views are unregistered by :meth:`_store` once the transaction ends.
        """
        _ensure_table(cursor, spec)
        cursor.register(_ROWS_VIEW, table)
        columns = ", ".join(_quote(name) for name in spec.schema.names)
        cursor.execute(
            f"INSERT INTO {_quote(spec.name)} BY NAME "
            f"SELECT {columns}, ?::VARCHAR AS edge_id, ?::VARCHAR AS batch_id FROM {_ROWS_VIEW}",
            [edge, batch.batch_id],
        )
        cursor.execute(
            f"INSERT INTO {BATCHES_TABLE} (batch_id, edge_id, stream, rows, raw_bytes, "
            "wire_bytes, received_at, priority, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                batch.batch_id,
                edge,
                spec.name,
                table.num_rows,
                batch.raw_bytes,
                wire_bytes,
                datetime.now(UTC),
                batch.priority,
                _from_us(batch.created_at_us),
            ],
        )


class _Stopping(Exception):
    """A call arrived while the receiver is stopping."""


class _StoreFailed(Exception):
    """The database failed while storing a batch; the transaction was rolled back."""


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ensure_table(cursor: duckdb.DuckDBPyConnection, spec: StreamSpec) -> None:
    """Create the stream's table (its Arrow schema plus edge_id, batch_id) if missing."""
    exists = cursor.execute(
        "SELECT 1 FROM duckdb_tables() WHERE schema_name = current_schema() AND table_name = ?",
        [spec.name],
    ).fetchall()
    if exists:
        return
    cursor.register(_EMPTY_VIEW, spec.schema.empty_table())
    extra = ", ".join(f"NULL::VARCHAR AS {name}" for name in _EDGE_COLUMNS)
    cursor.execute(
        f"CREATE TABLE {_quote(spec.name)} AS SELECT *, {extra} FROM {_EMPTY_VIEW} WITH NO DATA"
    )


def _decode(edge: str, batch: uplink_pb2.Batch) -> tuple[StreamSpec, pa.Table, list[str]]:
    """Check a batch and read its rows; raise :class:`_Rejected` with the Ack detail."""
    if not batch.batch_id:
        msg = "batch has no batch_id; the edge must set a deterministic batch_id"
        raise _Rejected(msg)
    if len(batch.batch_id) > MAX_BATCH_ID_LENGTH:
        msg = f"batch_id is {len(batch.batch_id)} characters long; at most {MAX_BATCH_ID_LENGTH}"
        raise _Rejected(msg)
    if batch.edge_id != edge:
        msg = (
            f"edge_id {batch.edge_id!r} does not match the authenticated edge key {edge!r}; an "
            "edge may push only its own batches (check edge_id and cloud.key in the edge config)"
        )
        raise _Rejected(msg)
    spec = STREAMS.get(batch.stream)
    if spec is None:
        msg = f"unknown stream {batch.stream!r}; this receiver stores {', '.join(sorted(STREAMS))}"
        raise _Rejected(msg)
    if not batch.arrow_ipc:
        msg = f"stream {spec.name!r}: arrow_ipc is empty; it must hold an Arrow IPC stream"
        raise _Rejected(msg)
    try:
        table = pa.ipc.open_stream(batch.arrow_ipc).read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        msg = (
            f"stream {spec.name!r}: arrow_ipc ({len(batch.arrow_ipc)} bytes) is not a readable "
            f"Arrow IPC stream: {_one_line(exc)}"
        )
        raise _Rejected(msg) from None
    if table.num_rows != batch.rows:
        msg = (
            f"stream {spec.name!r}: the batch says rows={batch.rows} but its Arrow data holds "
            f"{table.num_rows} rows; the batch was built wrongly or corrupted"
        )
        raise _Rejected(msg)
    clash = [name for name in _EDGE_COLUMNS if name in table.column_names]
    extra = [
        name
        for name in table.column_names
        if name not in spec.schema.names and name not in _EDGE_COLUMNS
    ]
    try:
        table = conform(spec, table)
    except (ValueError, TypeError) as exc:
        raise _Rejected(str(exc)) from None
    return spec, table, clash + extra


class _Servicer(uplink_pb2_grpc.UplinkServicer):
    """gRPC glue: authenticate, then hand the request stream to the receiver."""

    def __init__(self, receiver: CloudReceiver) -> None:
        self._receiver = receiver

    def Push(  # noqa: N802 (the gRPC method name)
        self, request_iterator: Iterator[uplink_pb2.Batch], context: grpc.ServicerContext
    ) -> Iterator[uplink_pb2.Ack]:
        """Authenticate the call, then answer every batch with an Ack."""
        peer = context.peer()
        metadata: Any = context.invocation_metadata() or ()
        edge = self._receiver.authenticate((m.key, m.value) for m in metadata)
        if edge is None:
            self._receiver._log_refusal(metadata, peer)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_DETAIL)
            return
        try:
            yield from self._receiver._push(edge, request_iterator, peer)
        except _Stopping:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the cloud receiver is stopping; retry")
        except _StoreFailed as exc:
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
    stop: threading.Event,
) -> None:
    """Run the receiver until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT).

    Raises :class:`AuthError` for a bad auth file, ``ValueError`` for a bad
    listen address or TLS file, :class:`ReceiverError` when the database
    cannot be opened or the address cannot be bound.
    """
    edges = load_auth(auth_file)
    with CloudReceiver(listen, db, edges, tls=tls):
        stop.wait()
