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
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from connectors.uplink.batch import Sealed
from connectors.uplink.channel import (
    ERROR_HINTS,
    channel_credentials,
    close_when_unwatched,
    open_channel,
)
from connectors.uplink.outbox import Outbox
from connectors.uplink.pacing import TokenBucket, backoff_delay
from connectors.uplink.settings import UplinkSettings
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

__all__ = ["UplinkSender", "UplinkStats"]

logger = logging.getLogger("edgesieve.uplink")

State = Literal["connected", "connecting", "backoff", "stopped"]

_POLL_S = 1.0




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
        self._credentials = channel_credentials(settings)
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

    def _run_session(self) -> _Outcome:
        self._set_state("connecting")
        session = _Session()
        channel = open_channel(self.settings, self._credentials)

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
            close_when_unwatched(channel)

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
            TokenBucket(self.settings.bandwidth_bytes_per_s)
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

    def _top_up(self, session: _Session, bucket: TokenBucket | None) -> bool:
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
            hint = ERROR_HINTS.get(code)
            text = f"stream failed with {code.name}: {details}"
            if hint:
                text += f". Hint: {hint}"
            return _Outcome("error", text, productive)
        return _Outcome("error", f"stream failed: {type(exc).__name__}: {exc}", productive)
