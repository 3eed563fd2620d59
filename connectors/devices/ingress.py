"""Device servers (HTTP, CoAP) feeding the dataflow through one bounded hand-off.

The servers run on one asyncio loop in a thread beside the dataflow. Each
request is authenticated by the server, then :meth:`Ingress.deliver` decodes
the body once (for the device's "malformed" answer) and hands it on, in one of
two modes:

- in memory (no journal): the message is queued in a bounded deque that
  :class:`DeviceServers` hands to the dataflow; a full queue refuses it, and
  the server answers 503 / 5.03, so memory never grows without bound;
- journaled (``Ingress(journal=...)``): the message is submitted to the ingest
  journal and the answer waits until the journal has committed it, so a device
  told "accepted" (200, 2.04) or "malformed, kept as a dead letter" (400,
  4.00) has its message on disk. A journal over its byte bound, a full disk
  (:class:`~connectors.devices.journal.JournalFull`) or a journal that
  pushes back (``admit()``) refuses it (503 / 5.03) with the journal's reason;
  so does a device holding its own share of the journal
  (``journal.device_share``), while other devices are still accepted.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from bytewax.inputs import DynamicSource, StatelessSourcePartition

from connectors.codecs.decode import DEFAULT_MAX_PAYLOAD_BYTES, decode
from connectors.devices.journal import Committed, Journal, JournalFull
from operators.records import DeadLetter, RawMessage

__all__ = [
    "DeviceServer",
    "DeviceServers",
    "Ingress",
    "Offer",
    "Verdict",
]

logger = logging.getLogger("edgesieve.ingress")

_IDLE_AWAKE = timedelta(milliseconds=5)
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 10.0


class Verdict(enum.Enum):
    """What became of one offered message."""

    ACCEPTED = "accepted"
    """Queued for the flow, or committed to the journal (HTTP 200, CoAP 2.04)."""
    REJECTED = "rejected"
    """Malformed; kept as a dead letter (HTTP 400, CoAP 4.00)."""
    TOO_LARGE = "too_large"
    """Over the payload limit; not kept (HTTP 413, CoAP 4.13)."""
    OVERLOADED = "overloaded"
    """The queue or the journal is full; not kept, the device should retry (HTTP 503, CoAP 5.03)."""


@dataclass(frozen=True, slots=True)
class Offer:
    """The verdict on one message, with the one-line reason for the device."""

    verdict: Verdict
    reason: str = ""


class Ingress:
    """Bounded hand-off from device servers to the dataflow, in memory or through a journal.

    Without ``journal`` accepted and rejected messages are queued in memory
    (at most ``max_messages``, and at most ``device_share`` of them from one
    device: 1, no per-device limit, unless set) for :class:`DeviceServers`;
    :meth:`offer` and :meth:`deliver` both work. With ``journal`` they are submitted to it and
    :meth:`deliver` returns only once the journal has committed them
    (``max_messages`` is then unused: the journal's own bound applies).
    Offers run on the servers' event loop thread.
    """

    def __init__(
        self,
        *,
        max_messages: int = 10_000,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retry_after_s: int = 1,
        journal: Journal | None = None,
        device_share: float = 1.0,
    ) -> None:
        if max_messages < 1 or max_payload_bytes < 1 or retry_after_s < 0:
            msg = (
                f"Ingress: max_messages and max_payload_bytes must be positive and "
                f"retry_after_s >= 0 (got {max_messages}, {max_payload_bytes}, {retry_after_s})"
            )
            raise ValueError(msg)
        if not 0 < device_share <= 1:
            msg = (
                f"Ingress: device_share must be above 0 and at most 1 (got {device_share}); "
                "hint: the fraction of max_messages one device may have queued, e.g. 0.25"
            )
            raise ValueError(msg)
        self.max_messages = max_messages
        self.device_share = device_share
        self._device_max = max(1, int(device_share * max_messages))
        self._queued: dict[str, int] = {}
        """Messages queued in memory per device (without a journal)."""
        self.max_payload_bytes = max_payload_bytes
        self.retry_after_s = retry_after_s
        self.journal = journal
        self._buf: deque[RawMessage] = deque()
        self.accepted = 0
        self.rejected = 0
        self.refused = 0
        self.aborted = 0
        """HTTP requests whose client closed the connection before the whole body arrived."""
        self.high_water = 0

    def busy(self, device: str | None = None) -> str | None:
        """Why a new message would be refused right now (the 503 / 5.03 reason), or None.

        With ``device``, that device's share of the journal (or of the queue) counts too.
        """
        if self.journal is not None:
            pushback = self.journal.admit(device)
            if pushback is None:
                return None
            return f"edge is busy: {pushback}; retry in {self.retry_after_s}s"
        if len(self._buf) >= self.max_messages:
            return f"edge is busy; retry in {self.retry_after_s}s"
        if device is not None and self._queued.get(device, 0) >= self._device_max:
            return (
                f"edge is busy: device {device} has {self._device_max} messages waiting for the "
                f"flow, the most one device may ({self.device_share:g} x {self.max_messages}); "
                f"retry in {self.retry_after_s}s"
            )
        return None

    def _judge(
        self, device: str, channel: str, transport: str, payload: bytes
    ) -> Offer | tuple[RawMessage, Offer]:
        """The refusal, or the decoded message with the verdict it earns once kept."""
        size = len(payload)
        if size > self.max_payload_bytes:
            self.refused += 1
            reason = (
                f"payload of {size} bytes is over the {self.max_payload_bytes}-byte limit; "
                "split it into smaller messages"
            )
            return Offer(Verdict.TOO_LARGE, reason)
        busy = self.busy(device)
        if busy is not None:
            self.refused += 1
            return Offer(Verdict.OVERLOADED, busy)
        msg = RawMessage(device, channel, transport, datetime.now(UTC), payload)
        result = decode(msg, max_payload_bytes=self.max_payload_bytes)
        decoded = RawMessage(device, channel, transport, msg.received_at, payload, result)
        if isinstance(result, DeadLetter):
            return decoded, Offer(Verdict.REJECTED, result.reason)
        return decoded, Offer(Verdict.ACCEPTED)

    def _kept(self, offer: Offer) -> Offer:
        if offer.verdict is Verdict.REJECTED:
            self.rejected += 1
        else:
            self.accepted += 1
        return offer

    def offer(self, device: str, channel: str, transport: str, payload: bytes) -> Offer:
        """Decode ``payload`` once and queue it in memory, unless too large or the queue is full.

        :raises RuntimeError: in journal mode, where only :meth:`deliver` keeps messages.
        """
        if self.journal is not None:
            msg = (
                f"Ingress.offer: this ingress writes to a journal, got a {transport} {channel} "
                "message to queue in memory; hint: await Ingress.deliver(), which answers "
                "after the commit"
            )
            raise RuntimeError(msg)
        judged = self._judge(device, channel, transport, payload)
        if isinstance(judged, Offer):
            return judged
        msg, offer = judged
        self._buf.append(msg)
        self._queued[device] = self._queued.get(device, 0) + 1
        size = len(self._buf)
        if size > self.high_water:
            self.high_water = size
        return self._kept(offer)

    async def deliver(
        self,
        device: str,
        channel: str,
        transport: str,
        payload: bytes,
        *,
        dedup_key: bytes | None = None,
        redelivery: bool = False,
    ) -> Offer:
        """Keep ``payload`` as :meth:`offer` does; in journal mode return after its commit.

        ``dedup_key`` identifies a transmission the device may repeat (CoAP's
        endpoint, message id and token): the journal stores a repeat once.
        ``redelivery`` (an MQTT PUBLISH with DUP set) stores the message once
        when the journal holds it already (see ``Journal.append``).

        Malformed messages are journaled too (the flow turns them into dead
        letters). A journal that refuses the message (over its byte bound, disk
        full, or closed because the edge is stopping) gives ``OVERLOADED`` with
        its reason. A request cancelled while waiting (the client went away)
        does not cancel the journal write.
        """
        journal = self.journal
        if journal is None:
            return self.offer(device, channel, transport, payload)
        judged = self._judge_journaled(device, channel, transport, payload)
        if isinstance(judged, Offer):
            return judged
        msg, offer = judged
        committed = asyncio.get_running_loop().create_future()
        journal.append(msg, self._committed, committed, dedup_key=dedup_key, redelivery=redelivery)
        try:
            await committed
        except JournalFull as exc:
            self.refused += 1
            return Offer(Verdict.OVERLOADED, f"edge is busy: {exc}; retry in {self.retry_after_s}s")
        except RuntimeError:
            self.refused += 1
            reason = f"edge is stopping, the message was not kept; retry in {self.retry_after_s}s"
            return Offer(Verdict.OVERLOADED, reason)
        return self._kept(offer)

    def _judge_journaled(
        self, device: str, channel: str, transport: str, payload: bytes
    ) -> Offer | tuple[RawMessage, Offer]:
        """:meth:`_judge` for the journal: the message to append (undecoded) and its verdict."""
        size = len(payload)
        if size > self.max_payload_bytes:
            return self._judge(device, channel, transport, payload)  # the refusal, counted
        busy = self.busy(device)
        if busy is not None:
            self.refused += 1
            return Offer(Verdict.OVERLOADED, busy)
        msg = RawMessage(device, channel, transport, datetime.now(UTC), payload)
        result = decode(msg, max_payload_bytes=self.max_payload_bytes)
        if isinstance(result, DeadLetter):
            return msg, Offer(Verdict.REJECTED, result.reason)
        return msg, Offer(Verdict.ACCEPTED)

    @staticmethod
    def _committed(
        waiters: list[asyncio.Future[None]], outcomes: list[Committed | BaseException]
    ) -> None:
        """The journal's callback (writer thread): one loop wake-up for the whole group.

        A refused message's callback runs at once on the loop thread itself,
        where the waiter is settled directly.
        """
        loop = waiters[0].get_loop()
        if len(waiters) == 1 and _running_loop() is loop:
            _settle(waiters, outcomes)
            return
        try:
            if all(waiter.get_loop() is loop for waiter in waiters):
                loop.call_soon_threadsafe(_settle, waiters, outcomes)
                return
            for waiter, outcome in zip(waiters, outcomes, strict=True):  # several loops: rare
                waiter.get_loop().call_soon_threadsafe(_settle, [waiter], [outcome])
        except RuntimeError:  # the loop is closed: its servers stopped, nobody waits for answers
            logger.debug("journal commit after the device servers' loop closed")

    def take(self, most: int) -> list[RawMessage]:
        """Remove and return up to ``most`` queued messages, oldest first."""
        buf = self._buf
        popleft = buf.popleft
        taken = [popleft() for _ in range(min(len(buf), most))]
        queued = self._queued
        for msg in taken:
            left = queued[msg.device] - 1
            if left:
                queued[msg.device] = left
            else:
                del queued[msg.device]
        return taken

    def oldest(self) -> datetime | None:
        """Receive time of the oldest queued message."""
        try:
            return self._buf[0].received_at
        except IndexError:
            return None

    def __len__(self) -> int:
        return len(self._buf)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle(waiters: list[asyncio.Future[None]], outcomes: list[Committed | BaseException]) -> None:
    """Resolve the waiters of committed messages (on their loop); a cancelled one is skipped.

    A request cancelled while waiting (the client went away) does not cancel
    the journal write; only its answer is dropped.
    """
    for waiter, outcome in zip(waiters, outcomes, strict=True):
        if waiter.done():
            continue
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(None)


class DeviceServer(Protocol):
    """A device-facing server run by :class:`DeviceServers` on its event loop."""

    name: str

    @property
    def running(self) -> bool:
        """Whether the server is bound and answering."""
        ...

    async def start(self) -> None:
        """Bind and start serving; raise if the address cannot be used."""
        ...

    async def stop(self) -> None:
        """Stop accepting requests and close connections."""
        ...


class _ServersPartition(StatelessSourcePartition[RawMessage]):
    def __init__(
        self,
        ingress: Ingress,
        servers: Sequence[DeviceServer],
        stop: threading.Event,
        *,
        max_batch: int,
        linger: timedelta,
    ) -> None:
        self._ingress = ingress
        self._servers = list(servers)
        self._stop = stop
        self._max_batch = max_batch
        self._linger = linger
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="edgesieve-device-servers", daemon=True
        )
        self._thread.start()
        self._stopped = False
        # on timeout wait_for cancels _start, which stops the servers it had started
        starting = asyncio.wait_for(self._start(), _START_TIMEOUT_S)
        future = asyncio.run_coroutine_threadsafe(starting, self._loop)
        try:
            future.result(timeout=_START_TIMEOUT_S + _STOP_TIMEOUT_S)
        except TimeoutError as exc:
            self._shutdown()
            names = ", ".join(server.name for server in self._servers)
            msg = (
                f"DeviceServers: the device servers ({names}) did not start within "
                f"{_START_TIMEOUT_S:g}s; hint: check their listen addresses"
            )
            raise TimeoutError(msg) from exc
        except BaseException:
            self._shutdown()
            raise

    async def _start(self) -> None:
        started: list[DeviceServer] = []
        try:
            for server in self._servers:
                await server.start()
                started.append(server)
        except BaseException:
            for server in started:
                await server.stop()
            raise

    def _shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._stop_servers(), self._loop)
            try:
                future.result(timeout=_STOP_TIMEOUT_S)
            except Exception:
                logger.exception("device servers did not stop cleanly")
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_STOP_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    async def _stop_servers(self) -> None:
        for server in self._servers:
            try:
                await server.stop()
            except Exception:
                logger.exception("%s server did not stop cleanly", server.name)

    def next_batch(self) -> list[RawMessage]:
        ingress = self._ingress
        if self._stop.is_set():
            self._shutdown()  # stop accepting first, then hand over everything
            batch = ingress.take(self._max_batch)
            if not batch:
                raise StopIteration
            return batch
        oldest = ingress.oldest()
        if oldest is None:
            return []
        if len(ingress) < self._max_batch and datetime.now(UTC) - oldest < self._linger:
            return []
        return ingress.take(self._max_batch)

    def next_awake(self) -> datetime | None:
        if self._stop.is_set() or len(self._ingress) >= self._max_batch:
            return None
        oldest = self._ingress.oldest()
        if oldest is None:
            return datetime.now(UTC) + _IDLE_AWAKE
        return oldest + self._linger

    def close(self) -> None:
        self._shutdown()


class _Idle(StatelessSourcePartition[RawMessage]):
    def next_batch(self) -> list[RawMessage]:
        raise StopIteration


class DeviceServers(DynamicSource[RawMessage]):
    """Runs device servers on worker 0 and hands their messages to the dataflow.

    The servers share one asyncio loop in a background thread. When ``stop``
    is set they stop accepting requests, the queued messages are handed over,
    and the input ends (so windows close and sinks flush). Other workers get
    no input from here; the messages reach them through Bytewax's keyed routing.
    """

    def __init__(
        self,
        ingress: Ingress,
        servers: Sequence[DeviceServer],
        *,
        stop: threading.Event | None = None,
        max_batch: int = 1_000,
        linger: timedelta = timedelta(milliseconds=20),
    ) -> None:
        self.ingress = ingress
        self.servers = list(servers)
        self.stop = stop if stop is not None else threading.Event()
        self._max_batch = max_batch
        self._linger = linger

    @property
    def ready(self) -> bool:
        """Whether every server is bound and answering."""
        return all(server.running for server in self.servers)

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSourcePartition[RawMessage]:
        """Worker 0 hosts the servers; the others end their input at once."""
        if worker_index != 0:
            return _Idle()
        return _ServersPartition(
            self.ingress,
            self.servers,
            self.stop,
            max_batch=self._max_batch,
            linger=self._linger,
        )
