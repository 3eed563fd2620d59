"""The mechanics every buffering sink partition shares: a lock, a flush timer, retries, close.

A subclass keeps its own buffer and says what is due (``_flush_due_locked``)
and how to empty it on close (``_flush_all_locked``); this base runs the timer
thread that flushes what becomes due while no batch arrives, spaces retries
after a failure, and stops the timer and flushes on close.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import abstractmethod

from bytewax.outputs import StatelessSinkPartition

__all__ = ["TimedFlushPartition"]

logger = logging.getLogger("edgesieve.sinks")


class TimedFlushPartition(StatelessSinkPartition[object]):
    """A sink partition whose buffer is flushed by size on write and by age on a timer.

    Subclasses call :meth:`_start_timer` at the end of their ``__init__``,
    hold ``self._lock`` while touching their buffer, and set
    ``self._retry_at`` (monotonic seconds) after a failed flush.
    """

    def _init_timer(self, *, where: str, thread: str, max_age_s: float, retry_s: float) -> None:
        self._where = where
        self._max_age_s = max_age_s
        self._retry_s = retry_s
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._run_timer, name=thread, daemon=True)

    def _start_timer(self) -> None:
        self._timer.start()

    @abstractmethod
    def _flush_due_locked(self, now: float) -> None:
        """Flush what is due at ``now`` (monotonic seconds); called with the lock held."""

    @abstractmethod
    def _flush_all_locked(self) -> None:
        """Flush everything on close; called with the lock held, after the timer stopped."""

    def close(self) -> None:
        """Stop the timer and flush everything still buffered."""
        self._stop.set()
        if self._timer.is_alive() and self._timer is not threading.current_thread():
            self._timer.join()
        with self._lock:
            self._flush_all_locked()

    def _run_timer(self) -> None:
        interval = min(1.0, max(0.01, self._max_age_s / 10))
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    self._flush_due_locked(time.monotonic())
            except Exception:
                self._retry_at = time.monotonic() + max(self._retry_s, interval)
                logger.exception(
                    "%s: a flush started by the timer thread failed unexpectedly; rows stay "
                    "buffered and the flush is retried",
                    self._where,
                )
