"""The journal's bounds: whether a message may be queued, and the reason when it may not.

:class:`Admission` holds what the bounds count (payload bytes held and
queued, messages queued, and both per device) and decides, under the
journal's lock, whether a message is queued or refused and with which
reason; :class:`~connectors.devices.journal.Journal` adds the queue and the
writer. See the package docstring (Bounds) for what is bounded.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from connectors.devices.journal.format import QUEUE_FACTOR, JournalFull, JournalSettings

_NONE = (0, 0)
"""The account of a device that holds nothing (never stored, never changed)."""


class Admission:
    """Accounts and bounds of the journal's append side (a mixin; see :meth:`_open_accounts`).

    ``_queue`` holds the messages waiting for the writer (its ``len`` is what
    the queue bound counts); ``_lock`` guards every account.
    """

    settings: JournalSettings
    root: Path
    _queue: Any
    _lock: threading.Lock
    _closing: bool

    def _open_accounts(self, settings: JournalSettings, held: dict[str, int]) -> None:
        """Set the bounds of ``settings`` and the bytes each device holds already (``held``)."""
        self._max_queue = QUEUE_FACTOR * settings.max_batch
        self._max_bytes = settings.max_bytes
        self._accounts: dict[str, list[int]] = {d: [size, 0] for d, size in held.items()}
        """Per device holding bytes: [payload bytes queued or held, messages queued].

        Under the lock: a message adds to both when queued, leaves the queue
        count when its commit is taken up, and gives its bytes back when its
        commit fails or finds a duplicate, else when the readers release it.
        """
        self._device_max_bytes = int(settings.device_share * settings.max_bytes)
        self._device_max_queue = max(1, int(settings.device_share * self._max_queue))
        self._pending_bytes = 0
        """Payload bytes queued and not yet committed."""
        self._held_bytes = sum(held.values())
        """Committed payload bytes not yet released by every reader (all partitions)."""
        self._disk_full: str | None = None
        self._broken: str | None = None
        """Why the journal refuses everything: a corrupt partition could not be replaced."""
        self._refused = 0
        self._refused_share = 0
        self._over_share = 0

    def _reserve(self, device: str, size: int, over_share: bool) -> BaseException | None:
        """Count a message of ``size`` bytes as queued; else the error it is refused with.

        Call with the lock held. See ``Journal.append_received`` for ``over_share``.
        """
        account = self._accounts.get(device, _NONE)
        if (
            len(self._queue) < self._max_queue
            and self._held_bytes + self._pending_bytes + size < self._max_bytes
            and not self._closing
            and self._broken is None
        ):
            if account[0] + size <= self._device_max_bytes and account[1] < self._device_max_queue:
                reason = None
            elif over_share and self._in_reserve_room(size):
                reason = None
                self._over_share += 1
            else:
                reason = self._share_refusal(device, account, size, over_share)
        elif self._closing:
            return RuntimeError(self._closed_message())
        elif self._broken is not None:
            reason = self._broken
        else:
            reason = self._refusal(size)
        if reason is not None:
            self._refused += 1
            return JournalFull(reason)
        if account is _NONE:
            self._accounts[device] = [size, 1]
        else:
            account[0] += size  # type: ignore[index]
            account[1] += 1  # type: ignore[index]
        self._pending_bytes += size
        return None

    def _released(self, size: int, sizes: dict[str, int]) -> None:
        """The readers released ``size`` bytes, ``sizes`` per device (lock held)."""
        self._held_bytes -= size
        accounts = self._accounts
        for device, released in sizes.items():
            account = accounts.get(device)
            if account is None:
                continue
            account[0] -= released
            if account[0] <= 0 and not account[1]:
                del accounts[device]

    def admit(self, device: str | None = None, *, over_share: bool = False) -> str | None:
        """None when there is room; otherwise the one-line reason devices are pushed back for.

        With ``device``, its own share is looked at too (``over_share``: as
        ``Journal.append_received`` does with it). Cheap when there is room (no
        lock: the bounds are read as they are).
        """
        account = _NONE if device is None else self._accounts.get(device, _NONE)
        if (
            len(self._queue) < self._max_queue
            and self._held_bytes + self._pending_bytes < self._max_bytes
            and self._disk_full is None
            and not self._closing
            and account[0] < self._device_max_bytes
            and account[1] < self._device_max_queue
            and self._broken is None
        ):
            return None
        with self._lock:
            if self._closing:
                return self._closed_message()
            if self._broken is not None:
                return self._broken
            if self._disk_full is not None:
                return self._disk_full
            refusal = self._refusal(0)
            if refusal is None and device is not None:
                account = self._accounts.get(device, _NONE)
                if account[0] >= self._device_max_bytes or account[1] >= self._device_max_queue:
                    if over_share and self._in_reserve_room(0):
                        return None
                    return self._share_message(device, account, 0, over_share)
            return refusal

    def _in_reserve_room(self, size: int) -> bool:
        """Whether a message over its device's share leaves one device's share free (lock held)."""
        return (
            self._held_bytes + self._pending_bytes + size < self._max_bytes - self._device_max_bytes
            and len(self._queue) < self._max_queue - self._device_max_queue
        )

    @property
    def queued(self) -> int:
        """Messages waiting for their commit (read without the lock)."""
        return len(self._queue)

    def _refusal(self, size: int) -> str | None:
        waiting = len(self._queue)
        if waiting >= self._max_queue:
            return (
                f"journal queue full: {waiting} messages wait to be committed to {self.root} "
                f"(limit {QUEUE_FACTOR} x journal.max_batch = {self._max_queue}); hint: the "
                "disk commits slower than messages arrive, retry later"
            )
        held = self._held_bytes + self._pending_bytes
        if held + size > self.settings.max_bytes or (size == 0 and held >= self.settings.max_bytes):
            return (
                f"journal full: {held} payload bytes held of journal.max_bytes="
                f"{self.settings.max_bytes} in {self.root} (got a {size}-byte message); hint: "
                "the readers have not released them yet, retry later or raise journal.max_bytes"
            )
        return None

    def _share_refusal(
        self, device: str, account: list[int] | tuple[int, int], size: int, over_share: bool
    ) -> str:
        """The reason a message of ``device`` over its share is refused (lock held), counted."""
        self._refused_share += 1
        return self._share_message(device, account, size, over_share)

    def _share_message(
        self, device: str, account: list[int] | tuple[int, int], size: int, over_share: bool
    ) -> str:
        share = self.settings.device_share
        if over_share:  # kept over its share until only the reserve is left
            return (
                f"journal nearly full: device {device} is over its share (journal.device_share="
                f"{share:g}) and the rest of journal.max_bytes={self.settings.max_bytes} and of "
                f"the commit queue in {self.root} is kept for the other devices (got a "
                f"{size}-byte message); hint: retry later"
            )
        if account[1] >= self._device_max_queue:
            return (
                f"journal queue share of device {device} full: {account[1]} of its messages "
                f"wait to be committed to {self.root} (limit journal.device_share={share:g} x "
                f"{self._max_queue} = {self._device_max_queue}); hint: this device sends "
                "faster than the disk commits, other devices are still accepted; retry later"
            )
        return (
            f"journal share of device {device} full: {account[0]} payload bytes held of "
            f"its {self._device_max_bytes} (journal.device_share={share:g} x "
            f"journal.max_bytes={self.settings.max_bytes}) in {self.root} (got a {size}-byte "
            "message); hint: this device sends faster than the flow takes its messages, "
            "other devices are still accepted; retry later or raise journal.device_share"
        )

    def _closed_message(self) -> str:
        return f"journal {self.root} is closed (got a submission); hint: open a new Journal"
