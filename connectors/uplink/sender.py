"""The uplink sender: drains the outbox to the cloud receiver over gRPC.

One background thread keeps a bidirectional ``Push`` stream open to the
receiver (``edgesieve.uplink.v1.Uplink``), authenticated by the call metadata
``x-edgesieve-key`` / ``x-edgesieve-secret``, over TLS when a CA or a client
certificate is configured (mutual TLS with both).

- Batches go out in outbox order (priority, then age) with at most
  ``window`` unacknowledged in flight. The serialized ``Batch`` stored in the
  outbox is sent as is, so ``wire_bytes`` are exactly the message bytes.
- ``Ack`` ``STORED`` or ``DUPLICATE`` deletes the batch from the outbox;
  ``REJECTED`` moves it to the outbox's ``rejected`` table, logged with the
  receiver's reason, and it is never sent again.
- Any RPC error (receiver down, stream dropped, no ``Ack`` for
  ``ack_timeout_s``) closes the stream; unacknowledged batches stay in the
  outbox and are sent again on the next stream (the receiver recognises
  repeats by ``batch_id``). Reconnection waits an exponential backoff with
  full jitter between ``backoff_min_s`` and ``backoff_max_s``;
  ``UNAUTHENTICATED`` is logged as an error with a hint and retried every
  ``backoff_max_s``.
- An optional token bucket caps the serialized bytes per second.
- The thread calls :meth:`Outbox.expire` every ``expire_interval_s``.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc

from connectors.common.address import parse_host_port
from connectors.common.pem import read_pem
from connectors.uplink.outbox import Outbox, Sealed
from connectors.uplink.wire import (
    DUPLICATE,
    KEY_HEADER,
    PUSH_METHOD,
    REJECTED,
    SECRET_HEADER,
    STORED,
    status_name,
)
from protos import uplink_pb2

__all__ = ["UplinkSender", "UplinkSettings", "UplinkStats", "backoff_delay"]

logger = logging.getLogger("edgesieve.uplink")

State = Literal["connected", "connecting", "backoff", "stopped"]

_POLL_S = 1.0

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: (
        "check that the receiver runs and is reachable at the target; with TLS, check "
        "tls_ca, the server certificate's names and the client certificate"
    ),
    grpc.StatusCode.DEADLINE_EXCEEDED: "the network or the receiver is slow",
    grpc.StatusCode.RESOURCE_EXHAUSTED: (
        "a batch may exceed the receiver's message size limit; seal smaller batches "
        "(cloud.batch_rows) or raise the receiver's grpc.max_receive_message_length"
    ),
    grpc.StatusCode.UNIMPLEMENTED: "the target is not an edgesieve receiver (no Uplink.Push)",
}


def _positive_number(name: str, value: object, hint: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        msg = f"UplinkSettings.{name} must be a positive number of seconds; got {value!r}. {hint}"
        raise ValueError(msg)


def _metadata_value(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        msg = f"UplinkSettings.{name} must be a non-empty string; got {type(value).__name__}"
        raise ValueError(msg)
    if any(not " " <= ch <= "~" for ch in value):
        msg = (
            f"UplinkSettings.{name} must be printable ASCII because it travels as gRPC "
            f"metadata; it contains a character outside 0x20-0x7E. Hint: generate it with "
            "secrets.token_urlsafe()"
        )
        raise ValueError(msg)


@dataclass(frozen=True)
class UplinkSettings:
    """Where and how the sender connects; the secret is left out of ``repr``.

    ``target`` is ``HOST:PORT`` (or any gRPC target URI such as
    ``dns:///host:port``). TLS is on when ``tls_ca`` (the CA that signed the
    receiver's certificate; None with a client certificate means the system
    roots) or ``tls_cert``/``tls_key`` (client certificate for mutual TLS, both
    or neither) are set; ``tls_server_name`` overrides the name checked in the
    receiver's certificate. ``window`` is how many batches may be in flight
    without an ``Ack``; ``ack_timeout_s`` is how long the stream may go
    without any ``Ack`` while batches are in flight before it is reopened (it
    must exceed the time the link needs to carry one batch).
    """

    target: str
    key: str
    secret: str = field(repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    backoff_min_s: float = 0.5
    backoff_max_s: float = 60.0
    bandwidth_bytes_per_s: int | None = None
    window: int = 32
    tls_server_name: str | None = None
    ack_timeout_s: float = 120.0
    expire_interval_s: float = 60.0

    def __post_init__(self) -> None:
        target = self.target
        if not isinstance(target, str) or ("://" not in target and not target.startswith("unix:")):
            parse_host_port(target, key="UplinkSettings.target", allow_port_zero=False)
        elif any(ch.isspace() for ch in target):
            msg = (
                f"UplinkSettings.target: a gRPC target URI has no spaces (got {target!r}); "
                "hint: dns:///cloud.example:50051"
            )
            raise ValueError(msg)
        _metadata_value("key", self.key)
        _metadata_value("secret", self.secret)
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str | Path):
                    msg = f"UplinkSettings.{name} must be a path or None; got {value!r}"
                    raise TypeError(msg)
                object.__setattr__(self, name, Path(value))
        if (self.tls_cert is None) != (self.tls_key is None):
            msg = (
                "UplinkSettings: set both tls_cert and tls_key for mutual TLS, or neither; got "
                f"tls_cert={self.tls_cert}, tls_key={self.tls_key}"
            )
            raise ValueError(msg)
        _positive_number("backoff_min_s", self.backoff_min_s, "Hint: 0.5")
        _positive_number("backoff_max_s", self.backoff_max_s, "Hint: 60")
        if self.backoff_max_s < self.backoff_min_s:
            msg = (
                f"UplinkSettings.backoff_max_s ({self.backoff_max_s}) must not be smaller than "
                f"backoff_min_s ({self.backoff_min_s})"
            )
            raise ValueError(msg)
        rate = self.bandwidth_bytes_per_s
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0):
            msg = (
                f"UplinkSettings.bandwidth_bytes_per_s must be a positive int or None "
                f"(unlimited); got {rate!r}"
            )
            raise ValueError(msg)
        window = self.window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            msg = f"UplinkSettings.window must be an int >= 1 (batches in flight); got {window!r}"
            raise ValueError(msg)
        _positive_number("ack_timeout_s", self.ack_timeout_s, "Hint: 120")
        _positive_number("expire_interval_s", self.expire_interval_s, "Hint: 60")
        if self.tls_server_name is not None and not isinstance(self.tls_server_name, str):
            msg = (
                "UplinkSettings.tls_server_name must be a string or None; got "
                f"{self.tls_server_name!r}"
            )
            raise TypeError(msg)

    @property
    def tls(self) -> bool:
        """Whether the channel uses TLS."""
        return self.tls_ca is not None or self.tls_cert is not None


@dataclass(frozen=True)
class UplinkStats:
    """Sender counters since :meth:`UplinkSender.start` (for metrics).

    ``sent`` counts batches handed to the stream (re-sends included) and
    ``wire_bytes`` their serialized size; ``acked`` counts batches deleted
    after ``STORED`` or ``DUPLICATE``, of which ``duplicates`` were
    ``DUPLICATE``; ``rejected`` counts ``REJECTED`` answers; ``reconnects``
    counts streams lost after they were opened.
    """

    state: str
    sent: int
    acked: int
    duplicates: int
    rejected: int
    wire_bytes: int
    reconnects: int
    last_error: str | None


def backoff_delay(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait before reconnection ``attempt`` (0 first): full jitter.

    Uniform between ``min_s`` and ``min(max_s, min_s * 2**attempt)``.
    """
    cap = min(max_s, min_s * 2.0 ** min(attempt, 64))
    return rng.uniform(min_s, cap)


def _close_when_unwatched(channel: grpc.Channel) -> None:
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


class _TokenBucket:
    """Bytes per second with a one-second burst; a large message borrows ahead."""

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = self.rate
        self.last = time.monotonic()

    def wait_s(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def spend(self, nbytes: int) -> None:
        self.tokens -= nbytes


@dataclass
class _InFlight:
    sealed: Sealed
    sent_at: float


@dataclass
class _Outcome:
    kind: Literal["stopped", "auth", "error"]
    detail: str = ""
    productive: bool = False


class _Session:
    """One Push stream: its queues, reader thread and in-flight batches."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.requests: queue.Queue[bytes | None] = queue.Queue()
        self.inflight: dict[str, _InFlight] = {}
        self.ready = False
        self.last_progress = time.monotonic()
        self.opened_at = time.monotonic()
        self.got_ack = False

    def request_iter(self) -> Iterator[bytes]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item


class UplinkSender:
    """Send what the outbox holds to the cloud receiver; see the module docstring.

    ``state`` is ``"connecting"`` (stream being opened), ``"connected"``
    (transport up), ``"backoff"`` (waiting before the next attempt) or
    ``"stopped"``. :meth:`stop` leaves unacknowledged batches in the outbox.
    """

    def __init__(self, outbox: Outbox, settings: UplinkSettings) -> None:
        if not isinstance(outbox, Outbox):
            msg = f"UplinkSender: outbox must be an Outbox; got {type(outbox).__name__}"
            raise TypeError(msg)
        if not isinstance(settings, UplinkSettings):
            msg = f"UplinkSender: settings must be an UplinkSettings; got {type(settings).__name__}"
            raise TypeError(msg)
        self._outbox = outbox
        self.settings = settings
        self._credentials = self._load_credentials(settings)
        self._metadata = ((KEY_HEADER, settings.key), (SECRET_HEADER, settings.secret))
        self._where = f"uplink to {settings.target}"
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._call: Any = None
        self._state: State = "stopped"
        self._next_expire = 0.0
        self._sent = 0
        self._acked = 0
        self._duplicates = 0
        self._rejected = 0
        self._wire_bytes = 0
        self._reconnects = 0
        self._last_error: str | None = None

    @staticmethod
    def _load_credentials(settings: UplinkSettings) -> grpc.ChannelCredentials | None:
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

    @property
    def state(self) -> str:
        """``"connected"``, ``"connecting"``, ``"backoff"`` or ``"stopped"``."""
        return self._state

    @property
    def stats(self) -> UplinkStats:
        """A snapshot of the counters."""
        with self._lock:
            return UplinkStats(
                state=self._state,
                sent=self._sent,
                acked=self._acked,
                duplicates=self._duplicates,
                rejected=self._rejected,
                wire_bytes=self._wire_bytes,
                reconnects=self._reconnects,
                last_error=self._last_error,
            )

    def start(self) -> None:
        """Start the sender thread (no-op if it runs)."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self._outbox.closed:
            msg = f"{self._where}: cannot start, the outbox {str(self._outbox.path)!r} is closed"
            raise RuntimeError(msg)
        self._stop.clear()
        self._outbox.add_listener(self._on_put)
        self._thread = threading.Thread(target=self._run, name="edgesieve-uplink", daemon=True)
        self._set_state("connecting")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close the stream and end the thread; unacknowledged batches stay in the outbox."""
        self._stop.set()
        self._outbox.remove_listener(self._on_put)
        session = self._session
        if session is not None:
            session.events.put(("stop", None))
        call = self._call
        if call is not None:
            call.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "%s: the sender thread did not stop within %.1fs; it ends on its own",
                    self._where,
                    timeout,
                )
        with self._progress:
            self._progress.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty; False if it is not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            if self._outbox.stats().batches == 0:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._progress:
                self._progress.wait(min(remaining, 0.1))

    def _on_put(self) -> None:
        session = self._session
        if session is not None:
            session.events.put(("wake", None))

    def _set_state(self, state: State, detail: str = "") -> None:
        with self._lock:
            if self._state == state:
                return
            self._state = state
        if state in ("connected", "stopped"):
            depth = self._depth()
            logger.info("%s: %s%s (outbox: %s)", self._where, state, detail, depth)
        else:
            logger.debug("%s: %s%s", self._where, state, detail)

    def _depth(self) -> str:
        try:
            stats = self._outbox.stats()
        except Exception as exc:
            return f"unavailable: {exc}"
        oldest = "" if stats.oldest_age_s is None else f", oldest {stats.oldest_age_s:.0f}s"
        return f"{stats.batches} batches, {stats.bytes} bytes{oldest}"

    def _run(self) -> None:
        attempt = 0
        try:
            while not self._stop.is_set():
                if self._outbox.closed:
                    logger.error(
                        "%s: the outbox %s was closed while the sender ran; the sender stops. "
                        "Hint: stop the sender before closing its outbox",
                        self._where,
                        self._outbox.path,
                    )
                    return
                self._maybe_expire()
                try:
                    outcome = self._run_session()
                except Exception as exc:
                    if self._outbox.closed:
                        continue
                    logger.exception("%s: unexpected error in the sender", self._where)
                    outcome = _Outcome("error", f"{type(exc).__name__}: {exc}")
                if outcome.kind == "stopped" or self._stop.is_set():
                    return
                with self._lock:
                    self._last_error = outcome.detail
                if outcome.productive:
                    attempt = 0
                if outcome.kind == "auth":
                    delay = self.settings.backoff_max_s
                    logger.error(
                        "%s: the cloud refused key %r: %s. Hint: check cloud.key and "
                        "cloud.secret against the receiver's auth file (edges: [{key, "
                        "secret}]); nothing is deleted from the outbox, retrying in %.1fs "
                        "(outbox: %s)",
                        self._where,
                        self.settings.key,
                        outcome.detail,
                        delay,
                        self._depth(),
                    )
                else:
                    delay = backoff_delay(
                        attempt, self.settings.backoff_min_s, self.settings.backoff_max_s, self._rng
                    )
                    attempt += 1
                    logger.warning(
                        "%s: %s; unacknowledged batches stay in the outbox and are sent "
                        "again, retrying in %.2fs (outbox: %s)",
                        self._where,
                        outcome.detail,
                        delay,
                        self._depth(),
                    )
                self._set_state("backoff", f" for {delay:.2f}s")
                self._sleep(delay)
        finally:
            self._session = None
            self._call = None
            self._set_state("stopped")

    def _sleep(self, delay: float) -> None:
        """Wait ``delay`` seconds or until stopped, expiring old batches meanwhile."""
        end = time.monotonic() + delay
        while not self._stop.is_set():
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, max(0.0, self._next_expire - time.monotonic()) + 0.01))
            self._maybe_expire()

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now < self._next_expire:
            return
        self._next_expire = now + self.settings.expire_interval_s
        try:
            self._outbox.expire()
        except Exception:
            if not self._outbox.closed:
                logger.exception("%s: expiring old outbox batches failed", self._where)

    def _open_channel(self) -> grpc.Channel:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]
        if self.settings.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.settings.tls_server_name))
        if self._credentials is not None:
            return grpc.secure_channel(self.settings.target, self._credentials, options=options)
        return grpc.insecure_channel(self.settings.target, options=options)

    def _run_session(self) -> _Outcome:
        self._set_state("connecting")
        session = _Session()
        channel = self._open_channel()

        def on_connectivity(state: grpc.ChannelConnectivity) -> None:
            if state is grpc.ChannelConnectivity.READY:
                session.events.put(("ready", None))

        channel.subscribe(on_connectivity, try_to_connect=True)
        push = channel.stream_stream(
            PUSH_METHOD,
            request_serializer=None,
            response_deserializer=uplink_pb2.Ack.FromString,
        )
        call = push(session.request_iter(), metadata=self._metadata)
        reader = threading.Thread(
            target=self._read_acks, args=(call, session), name="edgesieve-uplink-acks", daemon=True
        )
        self._session = session
        self._call = call
        reader.start()
        try:
            return self._pump(session)
        finally:
            self._session = None
            self._call = None
            if session.ready and not self._stop.is_set():
                with self._lock:
                    self._reconnects += 1
            call.cancel()
            session.requests.put(None)
            reader.join(5.0)
            channel.unsubscribe(on_connectivity)
            _close_when_unwatched(channel)

    @staticmethod
    def _read_acks(call: Any, session: _Session) -> None:
        try:
            for ack in call:
                session.events.put(("ack", ack))
            session.events.put(("end", None))
        except grpc.RpcError as exc:
            session.events.put(("error", exc))
        except Exception as exc:
            session.events.put(("error", exc))

    def _pump(self, session: _Session) -> _Outcome:
        bucket = (
            _TokenBucket(self.settings.bandwidth_bytes_per_s)
            if self.settings.bandwidth_bytes_per_s
            else None
        )
        while True:
            if self._stop.is_set():
                return _Outcome("stopped")
            if session.ready and not self._top_up(session, bucket):
                return _Outcome("stopped")
            timeout = _POLL_S
            if session.inflight:
                waited = time.monotonic() - session.last_progress
                if waited >= self.settings.ack_timeout_s:
                    return _Outcome(
                        "error",
                        f"no Ack for {waited:.1f}s with {len(session.inflight)} batch(es) in "
                        f"flight (ack_timeout_s={self.settings.ack_timeout_s}); reopening the "
                        "stream",
                        self._productive(session),
                    )
                timeout = min(timeout, self.settings.ack_timeout_s - waited)
            try:
                kind, value = session.events.get(timeout=max(0.001, timeout))
            except queue.Empty:
                continue
            if kind == "stop":
                return _Outcome("stopped")
            if kind == "ready":
                session.ready = True
                session.last_progress = time.monotonic()
                self._set_state("connected")
            elif kind == "ack":
                outcome = self._on_ack(session, value)
                if outcome is not None:
                    return outcome
            elif kind == "end":
                return _Outcome(
                    "error",
                    "the receiver closed the stream",
                    self._productive(session),
                )
            elif kind == "error":
                return self._on_error(session, value)
            self._maybe_expire()

    def _productive(self, session: _Session) -> bool:
        up = time.monotonic() - session.opened_at
        return session.got_ack or (session.ready and up >= self.settings.backoff_max_s)

    def _top_up(self, session: _Session, bucket: _TokenBucket | None) -> bool:
        room = self.settings.window - len(session.inflight)
        if room <= 0:
            return True
        for sealed in self._outbox.next(room, exclude=session.inflight.keys()):
            size = len(sealed.payload)
            if bucket is not None:
                wait = bucket.wait_s()
                if wait > 0 and self._stop.wait(wait):
                    return False
                bucket.spend(size)
            if not session.inflight:
                session.last_progress = time.monotonic()
            session.inflight[sealed.batch_id] = _InFlight(sealed, time.monotonic())
            session.requests.put(bytes(sealed.payload))
            with self._lock:
                self._sent += 1
                self._wire_bytes += size
        return True

    def _on_ack(self, session: _Session, ack: uplink_pb2.Ack) -> _Outcome | None:
        entry = session.inflight.pop(ack.batch_id, None)
        if entry is None:
            logger.warning(
                "%s: Ack for batch %r that is not in flight (status %s); ignored",
                self._where,
                ack.batch_id,
                status_name(ack.status),
            )
            return None
        session.got_ack = True
        session.last_progress = time.monotonic()
        if not session.ready:
            session.ready = True
            self._set_state("connected")
        sealed = entry.sealed
        if ack.status in (STORED, DUPLICATE):
            self._outbox.ack(sealed.batch_id)
            with self._progress:
                self._acked += 1
                if ack.status == DUPLICATE:
                    self._duplicates += 1
                self._progress.notify_all()
            return None
        if ack.status == REJECTED:
            self._outbox.reject(sealed.batch_id, ack.detail)
            with self._progress:
                self._rejected += 1
                self._progress.notify_all()
            logger.error(
                "%s: the cloud REJECTED batch %s (stream %r, %d rows): %s. It was moved to "
                "the rejected table of the outbox %s and is not sent again. Hint: the cloud's "
                "reason says what to fix in the flow's output",
                self._where,
                sealed.batch_id,
                sealed.stream,
                sealed.rows,
                ack.detail or "(no detail)",
                self._outbox.path,
            )
            return None
        session.inflight[sealed.batch_id] = entry
        return _Outcome(
            "error",
            f"the receiver answered batch {sealed.batch_id} with unknown Ack status "
            f"{ack.status}; the batch stays in the outbox. Hint: the receiver speaks a different "
            "version of edgesieve.uplink.v1",
            True,
        )

    def _on_error(self, session: _Session, exc: BaseException) -> _Outcome:
        productive = self._productive(session)
        if isinstance(exc, grpc.RpcError) and isinstance(exc, grpc.Call):
            code = exc.code()
            details = exc.details() or ""
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return _Outcome("auth", f"{code.name}: {details}", productive)
            hint = _HINTS.get(code)
            text = f"stream failed with {code.name}: {details}"
            if hint:
                text += f". Hint: {hint}"
            return _Outcome("error", text, productive)
        return _Outcome("error", f"stream failed: {type(exc).__name__}: {exc}", productive)
