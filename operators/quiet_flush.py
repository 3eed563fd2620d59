"""Per-key event-time windows that a quiet key flushes by the wall clock.

:class:`QuietFlush` is the part shared by the window aggregates
(:mod:`operators.windows`) and the log summaries (:mod:`operators.logs`): when
a key has been silent long enough, on the wall clock, for event time to have
passed a window's end had it kept pace, the window is emitted early and kept
open (see :mod:`operators.windows`, "Quiet flush").
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from bytewax.operators import StatefulBatchLogic

__all__ = ["QuietFlush", "wall_clock"]

V = TypeVar("V")
E = TypeVar("E")
S = TypeVar("S")
_ZERO = timedelta(0)


def wall_clock() -> datetime:
    """Now, timezone-aware UTC (what a quiet key's silence is measured with)."""
    return datetime.now(UTC)


class QuietFlush(StatefulBatchLogic[V, E, S]):
    """Per-key event-time windows that a quiet key flushes by wall clock (windows and logs).

    A subclass keeps ``config.allowed_lateness``, ``newest`` (the key's
    newest event time), ``quiet_since`` (wall clock of its last item) and
    ``now``, and says which windows hold rows not emitted yet (``_due``),
    where a window ends (``_end``) and how to emit one (``_emit``). A window
    is flushed early once the key has been quiet for ``end - newest +
    allowed_lateness``, and stays open: more event time may still add to it.
    """

    __slots__ = ()

    config: Any
    newest: datetime | None
    quiet_since: datetime
    now: Callable[[], datetime]

    def _due(self) -> list[int]:
        raise NotImplementedError

    def _end(self, window_id: int) -> datetime:
        raise NotImplementedError

    def _emit(self, window_id: int, out: list[E]) -> None:
        raise NotImplementedError

    def notify_at(self) -> datetime | None:
        """Wall-clock time of the next quiet flush: silence of ``end - newest + lateness``."""
        if self.newest is None:
            return None
        due = self._due()
        if not due:
            return None
        wait = self._end(due[0]) - self.newest + self.config.allowed_lateness
        try:
            return self.quiet_since + max(wait, _ZERO)
        except OverflowError:
            return None

    def on_notify(self) -> tuple[list[E], bool]:
        """Flush the windows the key's silence has made due; keep them open."""
        out: list[E] = []
        if self.newest is not None:
            silence = self.now() - self.quiet_since
            horizon = self.newest - self.config.allowed_lateness + silence
            for window_id in self._due():
                if self._end(window_id) > horizon:
                    break
                self._emit(window_id, out)
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[E], bool]:
        """Flush every open window; keep them open, as a resumed run may add to them."""
        out: list[E] = []
        for window_id in self._due():
            self._emit(window_id, out)
        return out, StatefulBatchLogic.RETAIN
